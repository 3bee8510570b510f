//! Statistics of one generation, as one serialisable struct.

use serde::{Deserialize, Serialize};

/// What one generation did and how fast. `#[non_exhaustive]`: made by generations (or
/// deserialised); start from [`GenerationStats::default`] to build one by hand.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GenerationStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub new_tokens: usize,
    /// Draft tokens proposed (self-speculation only).
    pub drafted: usize,
    /// Draft tokens accepted by the verifier.
    pub accepted: usize,
    /// `accepted_histogram[k]`: verification steps that accepted exactly `k` drafts.
    pub accepted_histogram: Vec<usize>,
    /// Verification steps (self-speculation) or decode steps (other strategies).
    pub steps: usize,
    /// Token-positions computed by each layer (layer `l` at index `l`): the cost model.
    pub layer_positions: Vec<usize>,
    /// Milliseconds from the call to the first generated token.
    pub time_to_first_token_ms: f64,
    /// Milliseconds of the whole generation.
    pub total_ms: f64,
    /// Reads from the device to the host (each one waits for the device to finish its queued
    /// work): one per decoded token, or per self-speculative step, when the argmax is taken on
    /// the device.
    #[serde(default)]
    pub host_reads: usize,
    /// Values those reads carried (token ids, or whole logit rows when the host chooses).
    #[serde(default)]
    pub host_read_values: usize,
    /// Bytes allocated for the KV cache when the generation ended (its buffers start small and
    /// double up to the context as positions need them).
    pub kv_allocated_bytes: usize,
    /// Bytes of KV cache holding positions at the peak (rejected drafts included).
    pub kv_peak_used_bytes: usize,
    /// Adaptive self-speculation: `exit_histogram[e]`, the steps that drafted from exit `e`.
    #[serde(default)]
    pub exit_histogram: Vec<usize>,
    /// Adaptive self-speculation: the steps it took without drafting (autoregressive).
    #[serde(default)]
    pub autoregressive_steps: usize,
}

impl GenerationStats {
    /// Accepted drafts / drafted tokens; `None` when nothing was drafted (autoregressive
    /// decoding and early exit have no acceptance).
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.drafted > 0).then(|| self.accepted as f64 / self.drafted as f64)
    }

    /// Mean drafts accepted per verification step; `None` when nothing was drafted.
    pub fn mean_accepted_length(&self) -> Option<f64> {
        (self.drafted > 0 && self.steps > 0).then(|| self.accepted as f64 / self.steps as f64)
    }

    /// Milliseconds per generated token after the first (the decode rate).
    pub fn time_per_token_ms(&self) -> f64 {
        if self.new_tokens <= 1 {
            return self.total_ms;
        }
        (self.total_ms - self.time_to_first_token_ms) / (self.new_tokens - 1) as f64
    }

    /// Device-to-host reads per generated token.
    pub fn host_reads_per_token(&self) -> f64 {
        if self.new_tokens == 0 {
            0.0
        } else {
            self.host_reads as f64 / self.new_tokens as f64
        }
    }

    /// Generated tokens per second over the whole call.
    pub fn tokens_per_second(&self) -> f64 {
        if self.total_ms == 0.0 {
            0.0
        } else {
            self.new_tokens as f64 / (self.total_ms / 1000.0)
        }
    }
}
