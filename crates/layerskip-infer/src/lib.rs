//! # layerskip-infer
//!
//! Generation for LayerSkip models (arXiv 2404.16710) on any Burn backend:
//!
//! - [`Strategy::Autoregressive`]: the full model;
//! - [`Strategy::EarlyExit`]: layers `0..E` and the shared exit head;
//! - [`Strategy::SelfSpeculative`]: draft `d` tokens with layers `0..E`, verify them with layers
//!   `E..L` in one batched pass that starts from the drafts' exit hidden states and reuses the
//!   early layers' K/V, accept, and roll the one KV cache back by length. Greedy output equals the
//!   full model's token for token; with sampling, the rejection rule keeps the full model's
//!   output distribution.
//!
//! A [`Generator`] owns the cache, the stop conditions, streaming and timing; acceptance
//! ([`accept`]) and sampling ([`sampling`]) are pure functions. A [`Batch`] decodes several
//! autoregressive generations a step at a time together (a server's concurrent requests), each
//! token for token what a [`Generator`] gives for it alone.
//!
//! ```
//! use burn::backend::Flex;
//! use layerskip_infer::{GenerateOptions, Generator, Strategy};
//! use layerskip_model::{LlamaConfig, LlamaModel};
//!
//! let config = LlamaConfig {
//!     vocab_size: 64, hidden_size: 32, intermediate_size: 64, num_layers: 4,
//!     num_heads: 4, num_kv_heads: 2, head_dim: 8, max_position_embeddings: 128,
//!     eos_token_ids: vec![],
//!     ..LlamaConfig::default()
//! };
//! let model = LlamaModel::<Flex>::init(&config, &Default::default()).unwrap();
//! let mut generator = Generator::new(&model, 128).unwrap();
//! let options = |strategy| GenerateOptions::new(strategy).with_max_new_tokens(16);
//! let ar = generator.generate(&[1, 2, 3], &options(Strategy::Autoregressive), |_| true).unwrap();
//! let ss = generator
//!     .generate(&[1, 2, 3], &options(Strategy::SelfSpeculative { exit_layer: 2, speculations: 4 }), |_| true)
//!     .unwrap();
//! assert_eq!(ar.tokens, ss.tokens);
//! ```

pub mod accept;
pub mod adaptive;
mod autoregressive;
mod batch;
mod chat;
mod context;
mod error;
mod generator;
mod options;
pub mod sampling;
mod speculative;
mod stats;
mod text;

pub use batch::Batch;
pub use chat::ChatTemplate;
pub use error::{InferError, Result};
pub use generator::Generator;
pub use options::{GenerateOptions, Generation, StopReason, Strategy, StreamEvent, TokenMargin};
pub use sampling::SamplingConfig;
pub use stats::GenerationStats;
pub use text::TextStream;
