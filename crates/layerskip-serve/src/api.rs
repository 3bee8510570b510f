//! OpenAI's request and response bodies (the fields this server reads and writes), its error
//! shape, and LayerSkip's extra fields.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use layerskip_infer::{GenerationStats, Strategy};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<&'static str>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
            code: None,
        }
    }

    /// With a machine-readable code.
    pub fn with_code(self, code: &'static str) -> Self {
        Self {
            code: Some(code),
            ..self
        }
    }

    /// With another status.
    pub fn with_status(self, status: StatusCode) -> Self {
        Self { status, ..self }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Up to four.
    Many(Vec<String>),
}

/// `prompt`: a string, or a list holding one string (`n = 1` and batch prompts of one).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// The prompt.
    Text(String),
    /// A list of prompts (only one is served per request).
    List(Vec<String>),
}

/// LayerSkip's per-request options (the extra `layerskip` body field).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSkipOptions {
    /// `"ar"`, `"early-exit"` or `"self-spec"` (default: the server's).
    pub strategy: Option<String>,
    /// Exit layer E.
    pub exit_layer: Option<usize>,
    /// Drafts per self-speculative step.
    pub speculations: Option<usize>,
    /// Draft over the token ids `0..n` only (the output does not change).
    pub draft_vocab: Option<usize>,
    /// Stop drafting below this draft probability (the output does not change).
    pub draft_confidence: Option<f32>,
    /// Streamed chunks say how each token was made: `layerskip.tokens`, a list of
    /// `{"text", "source": "draft" | "correction" | "bonus" | "ar" | "early-exit",
    /// "exit_layer"?, "rejected"?}` (see [`crate::worker::TokenSource`]).
    #[serde(default)]
    pub provenance: bool,
    /// Token healing ([`layerskip_model::Tokenizer::healing`]): the prompt's last token is taken
    /// back and the first generated token begins with its text; the response is the
    /// continuation of the prompt as sent.
    #[serde(default)]
    pub heal: bool,
}

/// What completions and chat completions share.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    /// The model id (`GET /v1/models`).
    pub model: Option<String>,
    /// Tokens to generate (default 16 for completions, the context for chat).
    pub max_tokens: Option<i64>,
    /// The newer spelling of `max_tokens` in chat completions.
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature (0 = greedy; default 1 as in OpenAI's API).
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Number of choices (only 1).
    pub n: Option<u32>,
    /// Server-Sent Events.
    #[serde(default)]
    pub stream: bool,
    /// LayerSkip options.
    pub layerskip: Option<LayerSkipOptions>,
    /// Shorthand for `layerskip.strategy`.
    pub strategy: Option<String>,
    /// Top-k filter (an extension, as in vLLM; 0 = off).
    pub top_k: Option<usize>,
    /// Repetition penalty (an extension, as in vLLM; 1 = off).
    pub repetition_penalty: Option<f32>,
    /// OpenAI parameters this server does not implement: refused when set to anything but
    /// their neutral value, never silently ignored.
    pub frequency_penalty: Option<f32>,
    /// See `frequency_penalty`.
    pub presence_penalty: Option<f32>,
    /// See `frequency_penalty`.
    pub logprobs: Option<Value>,
    /// See `frequency_penalty`.
    pub echo: Option<bool>,
    /// See `frequency_penalty`.
    pub best_of: Option<u32>,
    /// See `frequency_penalty`.
    pub suffix: Option<String>,
    /// See `frequency_penalty`.
    pub logit_bias: Option<Value>,
}

impl Common {
    /// The first parameter set that this server does not implement, if any.
    pub fn unsupported(&self) -> Option<&'static str> {
        let set = |v: &Option<Value>| {
            v.as_ref()
                .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
        };
        [
            (
                "frequency_penalty",
                self.frequency_penalty.is_some_and(|p| p != 0.0),
            ),
            (
                "presence_penalty",
                self.presence_penalty.is_some_and(|p| p != 0.0),
            ),
            ("logprobs", set(&self.logprobs)),
            ("echo", self.echo == Some(true)),
            ("best_of", self.best_of.is_some_and(|n| n > 1)),
            (
                "suffix",
                self.suffix.as_ref().is_some_and(|s| !s.is_empty()),
            ),
            (
                "logit_bias",
                self.logit_bias
                    .as_ref()
                    .is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty())),
            ),
        ]
        .into_iter()
        .find(|(_, on)| *on)
        .map(|(name, _)| name)
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// The rest.
    #[serde(flatten)]
    pub common: Common,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// The rest.
    #[serde(flatten)]
    pub common: Common,
}

/// OpenAI's `usage`.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
}

impl Usage {
    /// From a generation's statistics.
    pub fn of(stats: &GenerationStats) -> Self {
        Self {
            prompt_tokens: stats.prompt_tokens,
            completion_tokens: stats.new_tokens,
            total_tokens: stats.prompt_tokens + stats.new_tokens,
        }
    }
}

/// The `layerskip` response field: the strategy that ran and what self-speculation accepted,
/// from `(requested, ran)`; `requested_strategy` where the two differ (a greedy self-speculative
/// request decoded in the batch as autoregressive decoding, which gives the same tokens).
pub fn layerskip_report(
    (requested, strategy): (Strategy, Strategy),
    stats: &GenerationStats,
) -> Value {
    let mut report = json!({
        "strategy": strategy.name(),
        "exit_layer": strategy.exit_layer(),
        "speculations": strategy.speculations(),
        "exit_histogram": (!stats.exit_histogram.is_empty()).then_some(&stats.exit_histogram),
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "acceptance_rate": stats.acceptance_rate(),
        "mean_accepted_length": stats.mean_accepted_length(),
        "accepted_histogram": stats.accepted_histogram,
        "steps": stats.steps,
        "tokens_per_second": stats.tokens_per_second(),
        "time_to_first_token_ms": stats.time_to_first_token_ms,
        "time_per_token_ms": stats.time_per_token_ms(),
    });
    if requested != strategy {
        report["requested_strategy"] = json!(requested.name());
    }
    report
}
