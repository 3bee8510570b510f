//! What a generation is asked to do and what it returns: the strategy, the options, the result.

use serde::{Deserialize, Serialize};

use crate::sampling::{SamplingConfig, argmax};
use crate::stats::GenerationStats;

/// How the next tokens are produced. `#[non_exhaustive]`: a match outside this crate has a
/// wildcard arm, or reads a strategy through [`Strategy::name`], [`Strategy::exit_layer`] and
/// [`Strategy::speculations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Strategy {
    /// The full model, one token per step.
    Autoregressive,
    /// Layers `0..exit_layer`, then the shared exit head, one token per step.
    EarlyExit {
        /// Number of layers run (`E`).
        exit_layer: usize,
    },
    /// Draft `speculations` tokens with layers `0..exit_layer`, verify them with layers
    /// `exit_layer..L` in one pass that reuses the drafts' hidden states and early K/V.
    SelfSpeculative {
        /// Number of draft layers (`E`).
        exit_layer: usize,
        /// Drafts per step (`d`).
        speculations: usize,
    },
    /// Self-speculation that chooses its exit layer and draft count at every step from
    /// acceptance measured as it decodes (DEL, arXiv 2504.05598; see [`crate::adaptive`]).
    Adaptive {
        /// Most drafts per step.
        max_speculations: usize,
    },
}

impl Strategy {
    /// The strategy's name in the API: `ar`, `early-exit`, `self-spec` or `adaptive`.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Autoregressive => "ar",
            Strategy::EarlyExit { .. } => "early-exit",
            Strategy::SelfSpeculative { .. } => "self-spec",
            Strategy::Adaptive { .. } => "adaptive",
        }
    }

    /// The exit layer `E` it drafts or exits at, where it has a fixed one.
    pub fn exit_layer(&self) -> Option<usize> {
        match *self {
            Strategy::EarlyExit { exit_layer } | Strategy::SelfSpeculative { exit_layer, .. } => {
                Some(exit_layer)
            }
            Strategy::Autoregressive | Strategy::Adaptive { .. } => None,
        }
    }

    /// Drafts per step: `d` for self-speculation, the most for adaptive self-speculation.
    pub fn speculations(&self) -> Option<usize> {
        match *self {
            Strategy::SelfSpeculative { speculations, .. } => Some(speculations),
            Strategy::Adaptive { max_speculations } => Some(max_speculations),
            Strategy::Autoregressive | Strategy::EarlyExit { .. } => None,
        }
    }
}

/// A short label for tables: `AR`, `EE(E=4)`, `SS(E=4,d=3)`, `ADAPT(d<=6)`.
impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Through `pad`, so that a width in the format string applies (tables).
        let label = match *self {
            Strategy::Autoregressive => "AR".to_string(),
            Strategy::EarlyExit { exit_layer } => format!("EE(E={exit_layer})"),
            Strategy::SelfSpeculative {
                exit_layer,
                speculations,
            } => format!("SS(E={exit_layer},d={speculations})"),
            Strategy::Adaptive { max_speculations } => format!("ADAPT(d<={max_speculations})"),
        };
        f.pad(&label)
    }
}

/// Options of one generation. Built with [`GenerateOptions::new`] and the `with_*` setters (the
/// struct is `#[non_exhaustive]`, so that new options do not break callers).
///
/// ```
/// use layerskip_infer::{GenerateOptions, SamplingConfig, Strategy};
///
/// let ss = Strategy::SelfSpeculative { exit_layer: 2, speculations: 4 };
/// let options = GenerateOptions::new(ss).with_max_new_tokens(64).with_stop_tokens(vec![0]);
/// assert_eq!(options.sampling, SamplingConfig::default());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GenerateOptions {
    /// The strategy.
    pub strategy: Strategy,
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: SamplingConfig,
    /// Tokens that end the generation (emitted, then stop). Usually the checkpoint's EOS ids.
    pub stop_tokens: Vec<u32>,
    /// Self-speculation drafts over the token ids `0..n` only
    /// ([`LlamaModel::exit_head_prefix`](layerskip_model::LlamaModel::exit_head_prefix));
    /// `None` drafts over the whole vocabulary, as the paper does. Verification always uses the
    /// full head, so the output is the same either way: only the drafts' cost and acceptance
    /// change.
    #[serde(default)]
    pub draft_vocab: Option<usize>,
    /// Self-speculation stops drafting early once a draft's probability under the draft
    /// distribution falls below this threshold (that draft is still verified): uncertain drafts
    /// are mostly rejected, so drafting past them costs more than it returns. `None` always
    /// drafts the full `speculations`, as the paper does. The draft length only changes speed:
    /// greedy output equals autoregressive decoding and sampled output keeps the full model's
    /// distribution either way (Hugging Face's `assistant_confidence_threshold`).
    #[serde(default)]
    pub draft_confidence: Option<f32>,
    /// The ids the first new token is chosen among (`None`: any). Token healing
    /// ([`Tokenizer::healing`](layerskip_model::Tokenizer::healing)) sets it to the tokens that
    /// begin with the text of the prompt token it took back. Every strategy applies it the same
    /// way, so greedy self-speculation still gives autoregressive decoding's tokens.
    #[serde(default)]
    pub first_token_among: Option<Vec<u32>>,
}

impl GenerateOptions {
    /// Greedy `strategy` for up to 128 new tokens, no stop tokens, drafts over the whole
    /// vocabulary and always `speculations` of them.
    pub fn new(strategy: Strategy) -> Self {
        Self {
            strategy,
            max_new_tokens: 128,
            sampling: SamplingConfig::default(),
            stop_tokens: Vec::new(),
            draft_vocab: None,
            draft_confidence: None,
            first_token_among: None,
        }
    }

    /// Stop after `n` new tokens.
    pub fn with_max_new_tokens(self, n: usize) -> Self {
        Self {
            max_new_tokens: n,
            ..self
        }
    }

    /// How tokens are chosen.
    pub fn with_sampling(self, sampling: SamplingConfig) -> Self {
        Self { sampling, ..self }
    }

    /// Tokens that end the generation.
    pub fn with_stop_tokens(self, stop_tokens: Vec<u32>) -> Self {
        Self {
            stop_tokens,
            ..self
        }
    }

    /// Draft over the token ids `0..n` only ([`GenerateOptions::draft_vocab`]).
    pub fn with_draft_vocab(self, draft_vocab: Option<usize>) -> Self {
        Self {
            draft_vocab,
            ..self
        }
    }

    /// Stop drafting below this draft probability ([`GenerateOptions::draft_confidence`]).
    pub fn with_draft_confidence(self, draft_confidence: Option<f32>) -> Self {
        Self {
            draft_confidence,
            ..self
        }
    }

    /// Choose the first new token among `ids` ([`GenerateOptions::first_token_among`]).
    pub fn with_first_token_among(self, ids: Option<Vec<u32>>) -> Self {
        Self {
            first_token_among: ids,
            ..self
        }
    }

    /// Whether every token choice is an argmax of raw logits (greedy, no history penalties, no
    /// draft-confidence threshold), so the device can take it and hand back token ids alone.
    pub fn greedy_on_device(&self) -> bool {
        let s = &self.sampling;
        s.is_greedy()
            && s.repetition_penalty == 1.0
            && s.no_repeat_ngram == 0
            && self.draft_confidence.is_none()
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// A stop token was generated.
    StopToken,
    /// `max_new_tokens` reached.
    MaxNewTokens,
    /// The context is full.
    ContextFull,
    /// The caller's callback asked to stop (e.g. a stop string appeared).
    Callback,
}

/// The two best next tokens of a logit row and the gap between them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenMargin {
    /// The greedy token.
    pub first: u32,
    /// The runner-up.
    pub second: u32,
    /// `logit[first] - logit[second]` (>= 0).
    pub margin: f32,
    /// The largest absolute logit, the scale rounding errors are relative to.
    pub scale: f32,
}

impl TokenMargin {
    /// The two best entries of `logits` (at least two).
    pub fn of(logits: &[f32]) -> Self {
        let first = argmax(logits) as usize;
        let second = (0..logits.len())
            .filter(|&i| i != first)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .expect("at least two logits");
        Self {
            first: first as u32,
            second: second as u32,
            margin: logits[first] - logits[second],
            scale: logits.iter().fold(0f32, |m, v| m.max(v.abs())),
        }
    }
}

/// What the streaming callback receives. `#[non_exhaustive]`: match it with a wildcard arm.
///
/// A self-speculative step (fixed or adaptive) sends [`StreamEvent::Rejected`] (if the verifier
/// rejected a draft), then [`StreamEvent::Drafted`], then the step's
/// [`StreamEvent::Accepted`] tokens. Tokens without a `Drafted` before them are the model's own
/// choice: the full model's (autoregressive decoding, the prompt's first token) or the exit's
/// (early exit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEvent<'a> {
    /// Tokens accepted into the output, in order.
    Accepted(&'a [u32]),
    /// Drafted tokens that the verifier rejected (for display only).
    Rejected(&'a [u32]),
    /// How the next [`StreamEvent::Accepted`] tokens were made: the first `accepted` are drafts
    /// from exit `exit_layer` that the verifier accepted; the one after them is the verifier's
    /// own token (a correction where a draft was rejected, else the bonus token).
    Drafted {
        /// The exit layer `E` the drafts came from.
        exit_layer: usize,
        /// Drafts accepted.
        accepted: usize,
    },
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The generated tokens (a stop token, if one ended the generation, included).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
    /// Statistics.
    pub stats: GenerationStats,
}

#[cfg(test)]
mod tests {
    use super::Strategy;

    /// The names the API uses, the fixed exits and draft counts, and the table labels (padded
    /// by a width in the format string).
    #[test]
    fn strategies_describe_themselves() {
        let ss = Strategy::SelfSpeculative {
            exit_layer: 4,
            speculations: 3,
        };
        let adaptive = Strategy::Adaptive {
            max_speculations: 6,
        };
        let ee = Strategy::EarlyExit { exit_layer: 2 };
        let ar = Strategy::Autoregressive;
        let names: Vec<_> = [ar, ee, ss, adaptive].iter().map(Strategy::name).collect();
        assert_eq!(names, ["ar", "early-exit", "self-spec", "adaptive"]);
        assert_eq!(
            [ar, ee, ss, adaptive].map(|s| (s.exit_layer(), s.speculations())),
            [
                (None, None),
                (Some(2), None),
                (Some(4), Some(3)),
                (None, Some(6))
            ]
        );
        assert_eq!(format!("{ss:<14}|"), "SS(E=4,d=3)   |");
        assert_eq!(format!("{adaptive}/{ee}/{ar}"), "ADAPT(d<=6)/EE(E=2)/AR");
    }
}
