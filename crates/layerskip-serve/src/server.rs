//! The HTTP routes: OpenAI's completions, chat completions and models, plus health and metrics.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use layerskip_infer::{ChatTemplate, GenerationStats, InferError, Strategy};
use layerskip_model::Tokenizer;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{
    ApiError, ChatRequest, Common, CompletionRequest, Prompt, Usage, layerskip_report,
};
use crate::metrics::Metrics;
use crate::request::{Kind, Prepared, parse, prepare};
use crate::worker::{EngineHandle, Event, Finish, Job};

/// What the routes share: the engine's queue, the tokenizer and chat template, the defaults.
pub struct AppState {
    /// The engine thread's queue.
    pub engine: EngineHandle,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The checkpoint's chat template, if it has one.
    pub chat: Option<ChatTemplate>,
    /// The id clients name the model by.
    pub model_id: String,
    /// The strategy of requests that name none.
    pub default_strategy: Strategy,
    /// Token ids that end a generation (the checkpoint's eos ids).
    pub stop_tokens: Vec<u32>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    pub(crate) next_id: AtomicU64,
    started: u64,
}

impl AppState {
    /// The state of a server for `engine`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        chat: Option<ChatTemplate>,
        model_id: String,
        default_strategy: Strategy,
        stop_tokens: Vec<u32>,
        metrics: Arc<Metrics>,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            engine,
            tokenizer,
            chat,
            model_id,
            default_strategy,
            stop_tokens,
            metrics,
            max_body_bytes,
            next_id: AtomicU64::new(1),
            started: unix_time(),
        }
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The routes, with the body limit applied.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), declared_size))
        .with_state(state)
}

/// Refuses a body whose declared length is over the limit before reading any of it (the
/// extractor's limit also stops bodies without a length once they pass it).
async fn declared_size(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        state.metrics.refused();
        return too_large().into_response();
    }
    next.run(request).await
}

pub(crate) fn too_large() -> ApiError {
    ApiError::invalid("the request body is larger than the server accepts", None)
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// Serves `router` on `listener` until `shutdown` resolves; requests in flight (streams
/// included) are finished before it returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The web page: one self-contained file (no external requests), embedded in the binary.
const PAGE: &str = include_str!("page/index.html");

async fn page() -> Response {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        PAGE,
    )
        .into_response()
}

/// OpenAI's model list, with what a client of LayerSkip needs under `layerskip`: the layers,
/// the context, whether chat is available and the strategy of requests that name none.
async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let strategy = state.default_strategy;
    Json(json!({"object": "list", "data": [{
        "id": state.model_id, "object": "model", "created": state.started, "owned_by": "layerskip",
        "layerskip": {
            "layers": state.engine.layers,
            "context": state.engine.capacity,
            "chat": state.chat.is_some(),
            "default_strategy": {
                "strategy": strategy.name(),
                "exit_layer": strategy.exit_layer(),
                "speculations": strategy.speculations(),
            },
        },
    }]}))
}

async fn not_found() -> ApiError {
    ApiError::invalid("no such endpoint", None).with_status(StatusCode::NOT_FOUND)
}

async fn method_not_allowed() -> ApiError {
    ApiError::invalid("method not allowed on this endpoint", None)
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

/// Queues a prepared request and waits for the engine to start it (or refuse it).
async fn start(state: &AppState, p: &Prepared) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    state.metrics.received();
    let job = Job {
        prompt: p.prompt.clone(),
        options: p.options.clone(),
        stops: p.stops.clone(),
        events: tx,
        queued: Instant::now(),
        provenance: p.provenance,
        healed: p.healed.clone(),
    };
    let server_error =
        |m: String| ApiError::invalid(m, None).with_status(StatusCode::INTERNAL_SERVER_ERROR);
    state.engine.submit(job).map_err(server_error)?;
    match rx.recv().await {
        Some(Event::Started) => Ok(rx),
        Some(Event::Rejected(e)) => {
            let code =
                matches!(e, InferError::PromptTooLong { .. }).then_some("context_length_exceeded");
            let mut error = ApiError::invalid(e.to_string(), None);
            error.code = code;
            Err(error)
        }
        Some(Event::Failed(m)) => Err(server_error(m)),
        _ => Err(server_error("the engine ended the request".into())),
    }
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse(body).inspect_err(|_| state.metrics.refused())?;
    let text = match request.prompt {
        Prompt::Text(t) => t,
        Prompt::List(mut v) if v.len() == 1 => v.remove(0),
        Prompt::List(_) => {
            state.metrics.refused();
            return Err(ApiError::invalid(
                "only one prompt per request is supported",
                Some("prompt"),
            ));
        }
    };
    generate(state, request.common, text, Kind::Completion).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatRequest = parse(body).inspect_err(|_| state.metrics.refused())?;
    let Some(template) = &state.chat else {
        state.metrics.refused();
        return Err(ApiError::invalid(
            "this model has no chat template (tokenizer_config.json \"chat_template\"); use /v1/completions",
            Some("messages"),
        ));
    };
    if request.messages.is_empty()
        || request
            .messages
            .iter()
            .any(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
    {
        state.metrics.refused();
        return Err(ApiError::invalid(
            "messages must be a non-empty list with roles system, user or assistant",
            Some("messages"),
        ));
    }
    let messages: Vec<(&str, &str)> = request
        .messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    let text = template
        .render(&messages)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    generate(state, request.common, text, Kind::Chat).await
}

async fn generate(
    state: Arc<AppState>,
    common: Common,
    text: String,
    kind: Kind,
) -> Result<Response, ApiError> {
    let prepared =
        prepare(&state, &common, &text, kind).inspect_err(|_| state.metrics.refused())?;
    let mut rx = start(&state, &prepared).await?;
    let created = unix_time();
    let chunk = Chunk {
        id: prepared.id.clone(),
        created,
        model: state.model_id.clone(),
        kind,
    };
    if prepared.stream {
        let (tx, sse) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
        let strategy = prepared.strategy;
        tokio::spawn(async move {
            if kind == Kind::Chat {
                let first = chunk.delta(json!({"role": "assistant", "content": ""}), None);
                if tx
                    .send(Ok(SseEvent::default().data(first.to_string())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            while let Some(event) = rx.recv().await {
                let data = match event {
                    Event::Text { text, tokens } => {
                        let mut data = chunk.text(&text, None);
                        if !tokens.is_empty() {
                            data["layerskip"] = json!({ "tokens": tokens });
                        }
                        data
                    }
                    Event::Done {
                        finish,
                        stats,
                        strategy: ran,
                    } => chunk.last(finish, &stats, (strategy, ran)),
                    Event::Failed(m) => json!({"error": {"message": m, "type": "server_error"}}),
                    Event::Started | Event::Rejected(_) => continue,
                };
                // A send fails once the client has gone; dropping `rx` then cancels the job.
                if tx
                    .send(Ok(SseEvent::default().data(data.to_string())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        });
        return Ok(Sse::new(ReceiverStream::new(sse)).into_response());
    }
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Done {
                finish,
                stats,
                strategy: ran,
            } => {
                let strategies = (prepared.strategy, ran);
                return Ok(Json(chunk.whole(&text, finish, &stats, strategies)).into_response());
            }
            Event::Failed(m) => {
                return Err(
                    ApiError::invalid(m, None).with_status(StatusCode::INTERNAL_SERVER_ERROR)
                );
            }
            Event::Started | Event::Rejected(_) => {}
        }
    }
    Err(ApiError::invalid("the engine ended the request", None)
        .with_status(StatusCode::INTERNAL_SERVER_ERROR))
}

/// Builds the response bodies of one request.
struct Chunk {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Chunk {
    fn object(&self, streamed: bool) -> &'static str {
        match (self.kind, streamed) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
        }
    }

    fn envelope(&self, choice: Value, streamed: bool) -> Value {
        json!({
            "id": self.id, "object": self.object(streamed), "created": self.created,
            "model": self.model, "choices": [choice],
        })
    }

    fn delta(&self, delta: Value, finish: Option<Finish>) -> Value {
        self.envelope(
            json!({"index": 0, "delta": delta, "logprobs": null,
                   "finish_reason": finish.map(Finish::as_str)}),
            true,
        )
    }

    /// A streamed piece of text.
    fn text(&self, text: &str, finish: Option<Finish>) -> Value {
        match self.kind {
            Kind::Completion => self.envelope(
                json!({"index": 0, "text": text, "logprobs": null,
                       "finish_reason": finish.map(Finish::as_str)}),
                true,
            ),
            Kind::Chat => self.delta(json!({"content": text}), finish),
        }
    }

    /// The last streamed chunk: the finish reason, usage and LayerSkip's statistics.
    fn last(
        &self,
        finish: Finish,
        stats: &GenerationStats,
        strategies: (Strategy, Strategy),
    ) -> Value {
        let mut v = match self.kind {
            Kind::Completion => self.text("", Some(finish)),
            Kind::Chat => self.delta(json!({}), Some(finish)),
        };
        v["usage"] = json!(Usage::of(stats));
        v["layerskip"] = layerskip_report(strategies, stats);
        v
    }

    /// The whole (non-streamed) response.
    fn whole(
        &self,
        text: &str,
        finish: Finish,
        stats: &GenerationStats,
        strategies: (Strategy, Strategy),
    ) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({"index": 0, "text": text, "logprobs": null,
                                       "finish_reason": finish.as_str()}),
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": null, "finish_reason": finish.as_str()}),
        };
        let mut v = self.envelope(choice, false);
        v["usage"] = json!(Usage::of(stats));
        v["layerskip"] = layerskip_report(strategies, stats);
        v
    }
}
