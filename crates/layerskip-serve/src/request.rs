//! Requests checked and prepared: the body parsed, the fields OpenAI defines validated with
//! its error shapes, the strategy chosen, the prompt tokenized against the context.

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use layerskip_infer::{GenerateOptions, SamplingConfig, Strategy};

use crate::api::{ApiError, Common, Stop};
use crate::server::{AppState, too_large};

/// The body as JSON of type `T`, or OpenAI-shaped errors (413 for a body over the limit).
pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::invalid(r.body_text(), None).with_status(status)
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
}

/// Which endpoint a generation answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Completion,
    Chat,
}

/// A validated request, ready to queue.
pub(crate) struct Prepared {
    pub(crate) prompt: Vec<u32>,
    pub(crate) options: GenerateOptions,
    pub(crate) stops: Vec<String>,
    pub(crate) strategy: Strategy,
    pub(crate) stream: bool,
    pub(crate) id: String,
    /// Whether streamed chunks carry each token's provenance.
    pub(crate) provenance: bool,
    /// The text of the prompt token that token healing took back (empty: none).
    pub(crate) healed: String,
}

fn strategy_of(state: &AppState, common: &Common) -> Result<Strategy, ApiError> {
    let options = common.layerskip.clone().unwrap_or_default();
    let name = options.strategy.or(common.strategy.clone());
    let default_exit = state.default_strategy.exit_layer();
    let default_d = state.default_strategy.speculations().unwrap_or(4);
    let name = match name.as_deref() {
        None if options.exit_layer.is_none() && options.speculations.is_none() => {
            return Ok(state.default_strategy);
        }
        None => match state.default_strategy {
            Strategy::EarlyExit { .. } => "early-exit",
            Strategy::Adaptive { .. } if options.exit_layer.is_none() => "adaptive",
            _ => "self-spec",
        },
        Some(n) => n,
    };
    let exit = || {
        options.exit_layer.or(default_exit).ok_or_else(|| {
            ApiError::invalid(
                format!(
                    "layerskip.exit_layer is required for strategy {name:?} (the model has {} layers)",
                    state.engine.layers
                ),
                Some("layerskip.exit_layer"),
            )
        })
    };
    match name {
        "ar" if options.exit_layer.is_some() => Err(ApiError::invalid(
            "layerskip.exit_layer applies to early-exit and self-spec; \"ar\" runs every layer",
            Some("layerskip.exit_layer"),
        )),
        "ar" => Ok(Strategy::Autoregressive),
        "early-exit" => Ok(Strategy::EarlyExit {
            exit_layer: exit()?,
        }),
        "self-spec" => Ok(Strategy::SelfSpeculative {
            exit_layer: exit()?,
            speculations: options.speculations.unwrap_or(default_d),
        }),
        "adaptive" if options.exit_layer.is_some() => Err(ApiError::invalid(
            "layerskip.exit_layer does not apply to \"adaptive\", which chooses the exit layer at every step",
            Some("layerskip.exit_layer"),
        )),
        "adaptive" => Ok(Strategy::Adaptive {
            max_speculations: options.speculations.unwrap_or(default_d),
        }),
        other => Err(ApiError::invalid(
            format!("unknown strategy {other:?} (ar, early-exit, self-spec, adaptive)"),
            Some("layerskip.strategy"),
        )),
    }
}

/// A request's common fields checked and turned into what the engine runs: the prompt's
/// tokens, the generation options, the stop strings.
pub(crate) fn prepare(
    state: &AppState,
    common: &Common,
    text: &str,
    kind: Kind,
) -> Result<Prepared, ApiError> {
    check_supported(state, common)?;
    let (temperature, top_p) = sampling_ranges(common)?;
    let stops = stop_strings(common)?;
    let strategy = strategy_of(state, common)?;
    let prompt = state
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
    let layerskip = common.layerskip.clone().unwrap_or_default();
    let healing = layerskip
        .heal
        .then(|| state.tokenizer.healing(&prompt))
        .flatten();
    // Healed: the prompt without its last token, the first token's ids, that token's text.
    let (prompt, first_token_among, healed) = match healing {
        Some(h) => (h.prompt, Some(h.allowed), h.text),
        None => (prompt, None, String::new()),
    };
    let max_tokens = max_tokens(common, prompt.len(), state.engine.capacity, kind)?;
    let number = state.next_id.fetch_add(1, Ordering::Relaxed);
    let defaults = SamplingConfig::default();
    let sampling = SamplingConfig::default()
        .with_temperature(temperature)
        .with_top_p(top_p)
        .with_top_k(common.top_k.unwrap_or(defaults.top_k))
        .with_repetition_penalty(
            common
                .repetition_penalty
                .unwrap_or(defaults.repetition_penalty),
        )
        .with_seed(common.seed.unwrap_or(number));
    let options = GenerateOptions::new(strategy)
        .with_max_new_tokens(max_tokens)
        .with_sampling(sampling)
        .with_stop_tokens(state.stop_tokens.clone())
        .with_draft_vocab(layerskip.draft_vocab)
        .with_draft_confidence(layerskip.draft_confidence)
        .with_first_token_among(first_token_among);
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    Ok(Prepared {
        prompt,
        options,
        stops,
        strategy,
        stream: common.stream,
        id: format!("{prefix}-{number}"),
        provenance: layerskip.provenance,
        healed,
    })
}

/// The served model's name if the request names one, `n = 1`, no field this server ignores.
fn check_supported(state: &AppState, common: &Common) -> Result<(), ApiError> {
    if let Some(model) = &common.model
        && model != &state.model_id
    {
        return Err(ApiError::invalid(
            format!(
                "the model {model:?} does not exist; this server serves {:?}",
                state.model_id
            ),
            Some("model"),
        )
        .with_code("model_not_found")
        .with_status(StatusCode::NOT_FOUND));
    }
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    if let Some(name) = common.unsupported() {
        return Err(ApiError::invalid(
            format!("{name} is not supported by this server"),
            Some(name),
        ));
    }
    Ok(())
}

/// Temperature in `[0, 2]` (OpenAI's range; default 1) and top_p in `(0, 1]` (default 1).
fn sampling_ranges(common: &Common) -> Result<(f32, f32), ApiError> {
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature {temperature} is out of range [0, 2]"),
            Some("temperature"),
        ));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p {top_p} is out of range (0, 1]"),
            Some("top_p"),
        ));
    }
    Ok((temperature, top_p))
}

/// Up to 4 non-empty stop strings.
fn stop_strings(common: &Common) -> Result<Vec<String>, ApiError> {
    let stops = match &common.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stops.len() > 4 || stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop takes up to 4 non-empty strings",
            Some("stop"),
        ));
    }
    Ok(stops)
}

/// The tokens to generate: `max_completion_tokens` or `max_tokens` (at least 1, within the
/// context left after the prompt), else 16 for a completion and the rest of the context for a
/// chat.
fn max_tokens(
    common: &Common,
    prompt: usize,
    capacity: usize,
    kind: Kind,
) -> Result<usize, ApiError> {
    if prompt >= capacity {
        return Err(ApiError::invalid(
            format!(
                "the prompt has {prompt} tokens but the context holds {capacity} positions (at least one must remain for generation)"
            ),
            Some(if kind == Kind::Chat { "messages" } else { "prompt" }),
        )
        .with_code("context_length_exceeded"));
    }
    let room = capacity - prompt;
    match common.max_completion_tokens.or(common.max_tokens) {
        Some(n) if n < 1 => Err(ApiError::invalid(
            format!("max_tokens must be at least 1, got {n}"),
            Some("max_tokens"),
        )),
        Some(n) if n as u64 > room as u64 => Err(ApiError::invalid(
            format!(
                "the prompt ({prompt} tokens) and max_tokens ({n}) exceed the context of {capacity} positions"
            ),
            Some("max_tokens"),
        )
        .with_code("context_length_exceeded")),
        Some(n) => Ok(n as usize),
        None if kind == Kind::Completion => Ok(16.min(room)),
        None => Ok(room),
    }
}
