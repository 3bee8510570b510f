//! # layerskip-serve
//!
//! An OpenAI-compatible HTTP server for LayerSkip generation (axum on tokio):
//! `POST /v1/completions` and `/v1/chat/completions` (with `stream: true` as Server-Sent Events),
//! `GET /v1/models`, `GET /health` and `GET /metrics` (Prometheus). Per-request LayerSkip options
//! ride in an extra body field, `"layerskip": {"strategy": "self-spec", "exit_layer": 4,
//! "speculations": 6}`, and every response carries the acceptance statistics in a `layerskip`
//! field.
//!
//! The model is loaded once and owned by one engine thread ([`worker`]) that runs requests in
//! arrival order; the HTTP side ([`server`]) validates requests, queues them and streams what
//! the engine sends back. Errors have OpenAI's shape ([`api::ApiError`]).

pub mod api;
pub mod metrics;
mod request;
pub mod server;
pub mod worker;

pub use metrics::Metrics;
pub use server::{AppState, router, serve};
pub use worker::{EngineHandle, spawn};
