//! The decode core every strategy steps through: a [`DecodeContext`] (the model, the KV and
//! exit-hidden caches, the statistics) and a [`Run`] (one generation's tokens, options, random
//! stream and stop condition), both behind a small API:
//!
//! - run layers: [`DecodeContext::layers`], [`DecodeContext::draft_layers`] (early layers whose
//!   exit hidden states the verification reads), [`DecodeContext::verify`];
//! - choose: [`DecodeContext::next_token`], [`DecodeContext::logit_rows`],
//!   [`DecodeContext::device_argmax`], [`DecodeContext::read_ids`];
//! - draft: [`DecodeContext::draft_count`], [`DecodeContext::draft_on_device`],
//!   [`DecodeContext::draft_logits`];
//! - accept and roll back: [`DecodeContext::accept`], which also emits (with the tokens'
//!   provenance, [`StreamEvent::Drafted`]);
//! - emit: [`DecodeContext::emit`] (stop conditions, streaming).
//!
//! The strategies (`autoregressive`, `speculative`, `adaptive`) are functions of the two; a
//! [`Generator`](crate::Generator) owns one context, a [`Batch`](crate::Batch) one per generation.

use std::ops::Range;
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use layerskip_model::{ExitHiddenCache, KvCache, LayerSkipBackend, LlamaModel};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::accept::{Acceptance, accept_sampled};
use crate::error::{InferError, Result};
use crate::options::{GenerateOptions, Generation, StopReason, StreamEvent};
use crate::sampling::{apply_history_penalties, argmax, probabilities, sample};
use crate::stats::GenerationStats;

/// The model and the caches a generation decodes with, and what it counts.
pub(crate) struct DecodeContext<'m, B: LayerSkipBackend> {
    model: &'m LlamaModel<B>,
    cache: KvCache<B>,
    exits: ExitHiddenCache<B>,
    stats: GenerationStats,
    /// The most positions any layer's cache held during the current generation.
    peak_positions: usize,
}

/// One generation's state: its options, the prompt and generated tokens, its random stream and
/// why it stopped.
pub(crate) struct Run {
    options: GenerateOptions,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    rng: ChaCha8Rng,
    stop: Option<StopReason>,
    start: Instant,
}

/// The drafts of one self-speculative step and what the verifier made of them.
pub(crate) struct Step {
    pub(crate) acceptance: Acceptance,
    pub(crate) drafts: Vec<u32>,
}

impl Run {
    /// The state of a new generation from `prompt`; stopped at once when it may generate no
    /// token.
    pub(crate) fn new(prompt: &[u32], options: &GenerateOptions) -> Self {
        Self {
            options: options.clone(),
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            rng: ChaCha8Rng::seed_from_u64(options.sampling.seed),
            stop: (options.max_new_tokens == 0).then_some(StopReason::MaxNewTokens),
            start: Instant::now(),
        }
    }

    pub(crate) fn options(&self) -> &GenerateOptions {
        &self.options
    }

    /// Prompt and generated tokens so far.
    pub(crate) fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The position of the newest token (the one no layer has seen yet between steps).
    pub(crate) fn newest(&self) -> usize {
        self.tokens.len() - 1
    }

    /// Whether no stop condition has been met yet.
    pub(crate) fn is_running(&self) -> bool {
        self.stop.is_none()
    }

    /// Whether its tokens are chosen by a greedy argmax taken on the device.
    pub(crate) fn greedy_on_device(&self) -> bool {
        self.options.greedy_on_device()
    }

    /// Whether the next token is chosen by a greedy argmax on the device: as
    /// [`Run::greedy_on_device`], but for a first token restricted to some ids, which is chosen on
    /// the host ([`Run::choose_next`]).
    pub(crate) fn next_on_device(&self) -> bool {
        self.greedy_on_device()
            && !(self.tokens.len() == self.prompt_len && self.options.first_token_among.is_some())
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
    pub(crate) fn choose_next(&mut self, mut row: Vec<f32>) -> u32 {
        if self.tokens.len() == self.prompt_len
            && let Some(ids) = &self.options.first_token_among
        {
            // Every other id out; the allowed ones (checked against the vocabulary before the
            // generation) keep their logits.
            let mut allowed = vec![false; row.len()];
            for &id in ids {
                allowed[id as usize] = true;
            }
            for (logit, allowed) in row.iter_mut().zip(allowed) {
                if !allowed {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
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

    /// Speculative sampling of `drafts` (drawn from `q`) against the verifier's `p`, with this
    /// generation's random stream.
    pub(crate) fn accept_sampled(
        &mut self,
        drafts: &[u32],
        q: &[Vec<f32>],
        p: &[Vec<f32>],
    ) -> Acceptance {
        accept_sampled(drafts, q, p, &mut self.rng)
    }

    /// The generation this run made, with the statistics its context gathered.
    fn into_generation(self, mut stats: GenerationStats) -> Generation {
        stats.new_tokens = self.tokens.len() - self.prompt_len;
        stats.total_ms = self.start.elapsed().as_secs_f64() * 1e3;
        Generation {
            tokens: self.tokens[self.prompt_len..].to_vec(),
            stop: self.stop.unwrap_or(StopReason::MaxNewTokens),
            stats,
        }
    }
}

impl<'m, B: LayerSkipBackend> DecodeContext<'m, B> {
    /// A context over `cache` (cleared) whose exit-hidden cache holds `exit_capacity` positions
    /// (1 where no strategy drafts).
    pub(crate) fn new(
        model: &'m LlamaModel<B>,
        mut cache: KvCache<B>,
        exit_capacity: usize,
    ) -> Self {
        let device = model.device();
        cache.clear();
        Self {
            model,
            cache,
            exits: ExitHiddenCache::new(1, exit_capacity, model.config().hidden_size, &device),
            stats: GenerationStats::default(),
            peak_positions: 0,
        }
    }

    /// Empties the caches and statistics for a generation from a prompt of `prompt_len` tokens.
    pub(crate) fn begin(&mut self, prompt_len: usize) {
        self.cache.clear();
        self.exits.truncate(0);
        self.peak_positions = 0;
        self.stats = GenerationStats {
            prompt_tokens: prompt_len,
            layer_positions: vec![0; self.model.num_layers()],
            kv_allocated_bytes: self.cache.allocated_bytes(),
            ..Default::default()
        };
    }

    /// The generation `run` made, with what this context counted (its statistics taken).
    pub(crate) fn end(&mut self, run: Run) -> Generation {
        let mut stats = std::mem::take(&mut self.stats);
        stats.kv_allocated_bytes = self.cache.allocated_bytes();
        stats.kv_peak_used_bytes = self.cache.position_bytes() * self.peak_positions;
        run.into_generation(stats)
    }

    pub(crate) fn model(&self) -> &'m LlamaModel<B> {
        self.model
    }

    pub(crate) fn cache(&self) -> &KvCache<B> {
        &self.cache
    }

    /// The KV cache, for a pass that runs several contexts' positions together
    /// ([`DecodeContext::count_positions`] counts them).
    pub(crate) fn cache_mut(&mut self) -> &mut KvCache<B> {
        &mut self.cache
    }

    /// The KV cache, given back when the context ends.
    pub(crate) fn into_cache(self) -> KvCache<B> {
        self.cache
    }

    /// Positions the context holds.
    pub(crate) fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Counts `seq` positions from `start_pos` run through `layers` outside
    /// [`DecodeContext::layers`].
    pub(crate) fn count_positions(&mut self, layers: Range<usize>, start_pos: usize, seq: usize) {
        self.peak_positions = self.peak_positions.max(start_pos + seq);
        for l in layers {
            self.stats.layer_positions[l] += seq;
        }
    }

    /// Counts a decode step (a verification step for self-speculation).
    pub(crate) fn count_step(&mut self) {
        self.stats.steps += 1;
    }

    /// Counts an adaptive step that drafted `drafted` tokens from `exit` (none: autoregressive).
    pub(crate) fn count_exit(&mut self, exit: usize, drafted: usize) {
        if drafted == 0 {
            self.stats.autoregressive_steps += 1;
            return;
        }
        let used = &mut self.stats.exit_histogram;
        if used.len() <= exit {
            used.resize(exit + 1, 0);
        }
        used[exit] += 1;
    }

    /// Runs layers `range` over `x` from `start_pos`, with the cache, counting positions.
    pub(crate) fn layers(
        &mut self,
        x: Tensor<B, 3>,
        range: Range<usize>,
        start_pos: usize,
    ) -> Result<Tensor<B, 3>> {
        self.count_positions(range.clone(), start_pos, x.dims()[1]);
        Ok(self
            .model
            .forward_layers(x, range, start_pos, Some(&mut self.cache))?)
    }

    /// Layers `0..exit` over `x` from `start_pos`, their output kept in the exit-hidden cache
    /// for a later [`DecodeContext::verify`]; returns it.
    pub(crate) fn draft_layers(
        &mut self,
        x: Tensor<B, 3>,
        exit: usize,
        start_pos: usize,
    ) -> Result<Tensor<B, 3>> {
        let h = self.layers(x, 0..exit, start_pos)?;
        self.keep_exit_hidden(h.clone())?;
        Ok(h)
    }

    /// Appends hidden states to the exit-hidden cache.
    pub(crate) fn keep_exit_hidden(&mut self, h: Tensor<B, 3>) -> Result<()> {
        Ok(self.exits.append(h)?)
    }

    /// The exit hidden states kept for positions `start..`.
    pub(crate) fn exit_hidden(&self, start: usize) -> Tensor<B, 3> {
        self.exits.since(start)
    }

    /// The verification: layers `exit..L` once over the exit hidden states of positions
    /// `start..` (causal, offset `start`), appending the deep layers' K/V; returns the last
    /// layer's output.
    pub(crate) fn verify(&mut self, exit: usize, start: usize) -> Result<Tensor<B, 3>> {
        let layers = self.model.num_layers();
        self.layers(self.exits.since(start), exit..layers, start)
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
        if run.next_on_device() {
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

    /// Counts a read of `values` values to the host.
    pub(crate) fn count_read(&mut self, values: usize) {
        self.stats.host_reads += 1;
        self.stats.host_read_values += values;
    }

    /// Drafts to propose at this step: `speculations`, fewer near the token budget or the end of
    /// the context (each step emits accepted + 1 tokens and needs positions `c..=c + d`).
    pub(crate) fn draft_count(&self, run: &Run, speculations: usize) -> usize {
        speculations
            .min(run.budget() - 1)
            .min(self.capacity() - 1 - run.newest())
    }

    /// Greedy drafts on the device: `d` tokens through layers `0..exit` from the newest token's
    /// position `c`, each draft the next one's input, then the last draft through the same
    /// layers, every exit hidden state kept (positions `c..=c + d`). Returns the drafts' ids,
    /// still on the device.
    pub(crate) fn draft_on_device(
        &mut self,
        run: &Run,
        exit: usize,
        d: usize,
    ) -> Result<Vec<Tensor<B, 2, Int>>> {
        let c = run.newest();
        let current = TensorData::new(vec![i64::from(run.tokens()[c])], [1, 1]);
        let mut input = Tensor::<B, 2, Int>::from_data(current, &self.model.device());
        let mut ids = Vec::with_capacity(d + 1);
        for i in 0..d {
            let h = self.draft_layers(self.model.embed(input), exit, c + i)?;
            input = Self::device_argmax(self.draft_logits(h, run.options())?);
            ids.push(input.clone());
        }
        self.draft_layers(self.model.embed(input), exit, c + d)?;
        Ok(ids)
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

    /// Ends a self-speculative step of at most `speculations` drafts from `exit`: rolls the
    /// caches back to the accepted positions, counts, and emits the accepted drafts and the
    /// verifier's token.
    pub(crate) fn accept(
        &mut self,
        run: &mut Run,
        Step { acceptance, drafts }: Step,
        (exit, speculations): (usize, usize),
        on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
    ) {
        let Acceptance { accepted, next } = acceptance;
        // Positions c..=c+accepted hold tokens[c] and the accepted drafts.
        let keep = run.tokens.len() + accepted;
        self.cache.truncate(keep);
        self.exits.truncate(keep);
        if accepted < drafts.len() {
            on_event(StreamEvent::Rejected(&drafts[accepted..]));
        }
        if !drafts.is_empty() {
            on_event(StreamEvent::Drafted {
                exit_layer: exit,
                accepted,
            });
        }
        let mut new = drafts[..accepted].to_vec();
        new.push(next);
        let kept = self.emit(run, &new, on_event);
        // The statistics count the drafts that became output: a stop token among the accepted
        // drafts ends the generation there, and the drafts after it (and the verifier's token)
        // are not generated.
        let generated = accepted.min(kept);
        let stats = &mut self.stats;
        stats.steps += 1;
        stats.drafted += drafts.len();
        stats.accepted += generated;
        if stats.accepted_histogram.len() <= speculations {
            stats.accepted_histogram.resize(speculations + 1, 0);
        }
        stats.accepted_histogram[generated] += 1;
    }

    /// Appends accepted tokens, applying the stop conditions, and streams them; returns how many
    /// were kept (those up to a stop condition).
    pub(crate) fn emit(
        &mut self,
        run: &mut Run,
        new: &[u32],
        on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
    ) -> usize {
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
        kept
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
