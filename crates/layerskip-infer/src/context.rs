//! The decode context: what every strategy works on (the model, the KV and exit-hidden caches,
//! the statistics) and the per-call state ([`Run`]). The strategies (`autoregressive`,
//! `speculative`) are functions of it; the [`Generator`](crate::Generator) owns one.

use std::ops::Range;
use std::time::Instant;

use burn::tensor::{Int, Tensor};
use layerskip_model::{ExitHiddenCache, KvCache, LayerSkipBackend, LlamaModel};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{InferError, Result};
use crate::options::{GenerateOptions, StopReason, StreamEvent};
use crate::sampling::{apply_history_penalties, argmax, probabilities, sample};
use crate::stats::GenerationStats;

/// The model and the caches a generation decodes with, and what it counts.
pub(crate) struct DecodeContext<'m, B: LayerSkipBackend> {
    pub(crate) model: &'m LlamaModel<B>,
    pub(crate) cache: KvCache<B>,
    pub(crate) exits: ExitHiddenCache<B>,
    pub(crate) stats: GenerationStats,
    /// The most positions any layer's cache held during the current generation.
    pub(crate) peak_positions: usize,
}

/// Per-call state shared by the strategies.
pub(crate) struct Run {
    pub(crate) options: GenerateOptions,
    /// Prompt and generated tokens.
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_len: usize,
    pub(crate) rng: ChaCha8Rng,
    pub(crate) stop: Option<StopReason>,
    pub(crate) start: Instant,
}

impl Run {
    /// The state of a new generation from `prompt`.
    pub(crate) fn new(prompt: &[u32], options: &GenerateOptions) -> Self {
        Self {
            options: options.clone(),
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            rng: ChaCha8Rng::seed_from_u64(options.sampling.seed),
            stop: None,
            start: Instant::now(),
        }
    }

    /// New tokens still allowed.
    pub(crate) fn budget(&self) -> usize {
        self.options.max_new_tokens - (self.tokens.len() - self.prompt_len)
    }

    /// Chooses a token from a logit row given the tokens before it; returns it and the
    /// distribution it was drawn from.
    pub(crate) fn choose(&mut self, mut row: Vec<f32>, history: &[u32]) -> (u32, Vec<f32>) {
        let sampling = &self.options.sampling;
        apply_history_penalties(&mut row, history, sampling);
        if sampling.is_greedy() {
            return (argmax(&row), row);
        }
        let probs = probabilities(&row, sampling);
        (sample(&probs, &mut self.rng), probs)
    }

    /// Chooses the token after all of `tokens` from a logit row (see [`Run::choose`]).
    pub(crate) fn choose_next(&mut self, row: Vec<f32>) -> u32 {
        let history = std::mem::take(&mut self.tokens);
        let (token, _) = self.choose(row, &history);
        self.tokens = history;
        token
    }

    /// The processed (penalised) distribution of a verifier row, without drawing.
    pub(crate) fn distribution(&self, mut row: Vec<f32>, history: &[u32]) -> Vec<f32> {
        apply_history_penalties(&mut row, history, &self.options.sampling);
        if self.options.sampling.is_greedy() {
            row
        } else {
            probabilities(&row, &self.options.sampling)
        }
    }
}

impl<B: LayerSkipBackend> DecodeContext<'_, B> {
    /// Positions the context holds.
    pub(crate) fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Runs layers `range` over `x` from `start_pos`, with the cache, counting positions.
    pub(crate) fn layers(
        &mut self,
        x: Tensor<B, 3>,
        range: Range<usize>,
        start_pos: usize,
    ) -> Result<Tensor<B, 3>> {
        let seq = x.dims()[1];
        self.peak_positions = self.peak_positions.max(start_pos + seq);
        for l in range.clone() {
            self.stats.layer_positions[l] += seq;
        }
        Ok(self
            .model
            .forward_layers(x, range, start_pos, Some(&mut self.cache))?)
    }

    /// The token after the hidden state `last` `[1, 1, hidden]`: the argmax taken on the device
    /// when the run is greedy (rows with non-finite logits refused when `check`), else chosen on
    /// the host from the logit row.
    pub(crate) fn next_token(
        &mut self,
        run: &mut Run,
        last: Tensor<B, 3>,
        check: bool,
    ) -> Result<u32> {
        if run.options.greedy_on_device() {
            let logits = self.model.exit_head(last);
            let ids = if check {
                Self::device_argmax_checked(logits)
            } else {
                Self::device_argmax(logits)
            };
            Ok(self.read_ids(ids)?[0])
        } else {
            let row = self.logit_rows(last)?.remove(0);
            Ok(run.choose_next(row))
        }
    }

    /// Logit rows of the exit head applied to `hidden` `[1, seq, hidden]`, read to the host.
    pub(crate) fn logit_rows(&mut self, hidden: Tensor<B, 3>) -> Result<Vec<Vec<f32>>> {
        let rows = host_rows(self.model.exit_head(hidden))?;
        self.count_read(rows.len() * rows.first().map_or(0, Vec::len));
        Ok(rows)
    }

    /// The argmax of each row of `logits` `[1, seq, vocab]`, taken on the device.
    pub(crate) fn device_argmax(logits: Tensor<B, 3>) -> Tensor<B, 2, Int> {
        let [b, s, _] = logits.dims();
        logits.argmax(2).reshape([b, s])
    }

    /// [`DecodeContext::device_argmax`] with the id of a row that holds NaN or an infinity
    /// replaced by -1, which [`DecodeContext::read_ids`] turns into an error. Used on the prompt's
    /// step, where weights with non-finite values show (a few more launches, no more reads);
    /// rows read to the host are checked on every step.
    pub(crate) fn device_argmax_checked(logits: Tensor<B, 3>) -> Tensor<B, 2, Int> {
        let [b, s, _] = logits.dims();
        let bad = logits
            .clone()
            .is_nan()
            .bool_or(logits.clone().is_inf())
            .any_dim(2);
        logits.argmax(2).mask_fill(bad, -1).reshape([b, s])
    }

    /// Token ids `[1, n]` read to the host.
    pub(crate) fn read_ids(&mut self, ids: Tensor<B, 2, Int>) -> Result<Vec<u32>> {
        let values = ids.into_data().convert::<i64>();
        let ids = values
            .iter::<i64>()
            .map(|t| u32::try_from(t).map_err(|_| InferError::NonFiniteLogits))
            .collect::<Result<Vec<u32>>>()?;
        self.count_read(ids.len());
        Ok(ids)
    }

    pub(crate) fn count_read(&mut self, values: usize) {
        self.stats.host_reads += 1;
        self.stats.host_read_values += values;
    }

    /// The draft's logit row for `hidden` `[1, 1, hidden]`: over the whole vocabulary, or over
    /// the ids `0..n` with the rest at -inf when `options.draft_vocab` is `Some(n)`.
    pub(crate) fn draft_logit_row(
        &mut self,
        hidden: Tensor<B, 3>,
        options: &GenerateOptions,
    ) -> Result<Vec<f32>> {
        let vocab = self.model.config().vocab_size;
        let mut row = host_rows(self.draft_logits(hidden, options)?)?.remove(0);
        self.count_read(row.len());
        row.resize(vocab, f32::NEG_INFINITY);
        Ok(row)
    }

    /// The draft's logits for `hidden` `[1, seq, hidden]`: over the whole vocabulary, or over
    /// the ids `0..n` when `options.draft_vocab` is `Some(n)`.
    pub(crate) fn draft_logits(
        &self,
        hidden: Tensor<B, 3>,
        options: &GenerateOptions,
    ) -> Result<Tensor<B, 3>> {
        let vocab = self.model.config().vocab_size;
        Ok(match options.draft_vocab.filter(|&n| n < vocab) {
            None => self.model.exit_head(hidden),
            Some(n) => self.model.exit_head_prefix(hidden, n)?,
        })
    }

    /// Appends accepted tokens, applying the stop conditions, and streams them.
    pub(crate) fn emit(
        &mut self,
        run: &mut Run,
        new: &[u32],
        on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
    ) {
        if run.tokens.len() == run.prompt_len {
            self.stats.time_to_first_token_ms = run.start.elapsed().as_secs_f64() * 1e3;
        }
        let mut kept = 0;
        for &t in new {
            if run.stop.is_some() {
                break;
            }
            run.tokens.push(t);
            kept += 1;
            if run.options.stop_tokens.contains(&t) {
                run.stop = Some(StopReason::StopToken);
            } else if run.budget() == 0 {
                run.stop = Some(StopReason::MaxNewTokens);
            } else if run.tokens.len() >= self.capacity() {
                run.stop = Some(StopReason::ContextFull);
            }
        }
        if !on_event(StreamEvent::Accepted(&new[..kept])) && run.stop.is_none() {
            run.stop = Some(StopReason::Callback);
        }
    }
}

/// Logits `[batch, seq, n]` (any float dtype) as host rows of `n` f32 values; an error if any
/// is NaN or infinite.
pub(crate) fn host_rows<B: LayerSkipBackend>(logits: Tensor<B, 3>) -> Result<Vec<Vec<f32>>> {
    let n = logits.dims()[2];
    let values = logits
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 logits");
    if !values.iter().all(|v| v.is_finite()) {
        return Err(InferError::NonFiniteLogits);
    }
    Ok(values.chunks(n).map(<[f32]>::to_vec).collect())
}
