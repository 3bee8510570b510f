//! The [`Generator`]: prefill, the decode loop, stop conditions, streaming and timing. Strategies
//! only say how the next tokens are produced.

use layerskip_model::LayerSkipBackend;
use std::ops::Range;
use std::time::Instant;

use burn::tensor::{Int, Tensor};
use layerskip_model::{ExitHiddenCache, KvCache, LlamaModel};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};
use crate::sampling::{SamplingConfig, apply_history_penalties, argmax, probabilities, sample};
use crate::stats::GenerationStats;

/// How the next tokens are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// What the streaming callback receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent<'a> {
    /// Tokens accepted into the output, in order.
    Accepted(&'a [u32]),
    /// Drafted tokens that the verifier rejected (for display only).
    Rejected(&'a [u32]),
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

/// Runs generations on one model with one preallocated KV cache (reused across calls).
pub struct Generator<'m, B: LayerSkipBackend> {
    pub(crate) model: &'m LlamaModel<B>,
    pub(crate) cache: KvCache<B>,
    pub(crate) exits: ExitHiddenCache<B>,
    pub(crate) stats: GenerationStats,
    /// The most positions any layer's cache held during the current generation.
    peak_positions: usize,
}

/// Per-call state shared by the strategies.
pub(crate) struct Run<'a> {
    pub(crate) options: &'a GenerateOptions,
    /// Prompt and generated tokens.
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_len: usize,
    pub(crate) rng: ChaCha8Rng,
    pub(crate) stop: Option<StopReason>,
    pub(crate) start: Instant,
}

impl Run<'_> {
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

impl<'m, B: LayerSkipBackend> Generator<'m, B> {
    /// A generator whose context holds `capacity` positions (prompt + generation).
    pub fn new(model: &'m LlamaModel<B>, capacity: usize) -> Result<Self> {
        let config = model.config();
        if capacity == 0 || capacity > config.max_position_embeddings {
            return Err(InferError::InvalidArgument(format!(
                "context capacity {capacity} must be in 1..={}",
                config.max_position_embeddings
            )));
        }
        let device = model.embed_tokens.device();
        Ok(Self {
            model,
            cache: KvCache::new(config, 1, capacity, &device),
            exits: ExitHiddenCache::new(1, capacity, config.hidden_size, &device),
            stats: GenerationStats::default(),
            peak_positions: 0,
        })
    }

    /// The model.
    pub fn model(&self) -> &LlamaModel<B> {
        self.model
    }

    /// The KV cache as the last generation left it.
    pub fn cache(&self) -> &KvCache<B> {
        &self.cache
    }

    /// Positions the context holds.
    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// The full model's greedy choice after `context` and how decisively it wins: the gap
    /// between the two largest logits. Without a cache, so it is independent of any strategy.
    ///
    /// Where greedy decoding by two strategies diverges, a gap within the compute dtype's
    /// rounding error means the divergence is a tie broken differently by rounding (batched
    /// verification vs one-token steps), not a wrong token.
    pub fn next_token_margin(&self, context: &[u32]) -> Result<TokenMargin> {
        if context.is_empty() {
            return Err(InferError::InvalidArgument("empty context".into()));
        }
        let layers = 0..self.model.num_layers();
        let hidden = self
            .model
            .forward_layers(self.model.embed_ids(context), layers, 0, None)?;
        let n = context.len();
        let logits = self.model.exit_head(hidden.slice([0..1, n - 1..n]));
        Ok(TokenMargin::of(&host_rows(logits).remove(0)))
    }

    /// Runs `options`' strategy untimed on two short synthetic prompts (one of a few tokens, one
    /// longer than the row kernels take, where the context allows) for a few tokens, so that a
    /// backend that compiles its kernels on first use (CubeCL: CUDA, wgpu) or prepares weights on
    /// first use (Flex's packed copies) does it before the first real prompt. Returns the
    /// milliseconds it took.
    pub fn warm_up(&mut self, options: &GenerateOptions) -> Result<f64> {
        let start = Instant::now();
        let vocab = self.model.config().vocab_size as u32;
        let warm = GenerateOptions {
            max_new_tokens: 4,
            stop_tokens: Vec::new(),
            ..options.clone()
        };
        for len in [3, 40] {
            let len = len.min(self.capacity().saturating_sub(warm.max_new_tokens + 1));
            if len == 0 {
                continue;
            }
            let prompt: Vec<u32> = (0..len as u32).map(|i| (i * 7 + 1) % vocab).collect();
            self.generate(&prompt, &warm, |_| true)?;
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }

    /// Checks a prompt and options (exit layer range, speculations, sampling, context) without
    /// generating: the error [`Generator::generate`] would return.
    pub fn validate(&self, prompt: &[u32], options: &GenerateOptions) -> Result<()> {
        let layers = self.model.num_layers();
        let bad = |m: String| Err(InferError::InvalidArgument(m));
        options.sampling.validate()?;
        if prompt.is_empty() {
            return bad("the prompt is empty".into());
        }
        if let Some(t) = prompt
            .iter()
            .find(|&&t| t as usize >= self.model.config().vocab_size)
        {
            return bad(format!("prompt token {t} is outside the vocabulary"));
        }
        if prompt.len() >= self.capacity() {
            return Err(InferError::PromptTooLong {
                prompt: prompt.len(),
                capacity: self.capacity(),
            });
        }
        let vocab = self.model.config().vocab_size;
        if let Some(n) = options.draft_vocab
            && (n == 0 || n > vocab)
        {
            return bad(format!(
                "draft vocabulary {n} is out of range: the model's vocabulary has {vocab} tokens"
            ));
        }
        if let Some(c) = options.draft_confidence
            && !(c > 0.0 && c <= 1.0)
        {
            return bad(format!(
                "draft confidence {c} is out of range: it is a probability in (0, 1]"
            ));
        }
        match options.strategy {
            Strategy::EarlyExit { exit_layer: e }
            | Strategy::SelfSpeculative { exit_layer: e, .. }
                if e == 0
                    || e > layers
                    || (e == layers
                        && matches!(options.strategy, Strategy::SelfSpeculative { .. })) =>
            {
                bad(format!(
                    "exit layer {e} is out of range: the model has {layers} layers (early exit: 1..={layers}, self-speculation: 1..{layers})"
                ))
            }
            Strategy::SelfSpeculative {
                speculations: 0, ..
            } => bad("speculations must be >= 1".into()),
            _ => Ok(()),
        }
    }

    /// Generates from `prompt`. `on_event` sees tokens as soon as they are accepted and returns
    /// `false` to stop.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_event: impl FnMut(StreamEvent<'_>) -> bool,
    ) -> Result<Generation> {
        self.validate(prompt, options)?;
        self.cache.clear();
        self.exits.truncate(0);
        self.peak_positions = 0;
        let layers = self.model.num_layers();
        self.stats = GenerationStats {
            prompt_tokens: prompt.len(),
            layer_positions: vec![0; layers],
            kv_allocated_bytes: self.cache.allocated_bytes(),
            ..Default::default()
        };
        let mut run = Run {
            options,
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            rng: ChaCha8Rng::seed_from_u64(options.sampling.seed),
            stop: None,
            start: Instant::now(),
        };
        if options.max_new_tokens > 0 {
            match options.strategy {
                Strategy::Autoregressive => self.decode_loop(&mut run, layers, &mut on_event)?,
                Strategy::EarlyExit { exit_layer } => {
                    self.decode_loop(&mut run, exit_layer, &mut on_event)?
                }
                Strategy::SelfSpeculative {
                    exit_layer,
                    speculations,
                } => self.self_speculate(&mut run, exit_layer, speculations, &mut on_event)?,
            }
        }
        let mut stats = std::mem::take(&mut self.stats);
        stats.new_tokens = run.tokens.len() - run.prompt_len;
        stats.total_ms = run.start.elapsed().as_secs_f64() * 1e3;
        stats.kv_peak_used_bytes =
            self.cache.allocated_bytes() / self.capacity() * self.peak_positions;
        Ok(Generation {
            tokens: run.tokens[run.prompt_len..].to_vec(),
            stop: run.stop.unwrap_or(StopReason::MaxNewTokens),
            stats,
        })
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

    /// Logit rows of the exit head applied to `hidden` `[1, seq, hidden]`, read to the host.
    pub(crate) fn logit_rows(&mut self, hidden: Tensor<B, 3>) -> Vec<Vec<f32>> {
        let rows = host_rows(self.model.exit_head(hidden));
        self.count_read(rows.len() * rows.first().map_or(0, Vec::len));
        rows
    }

    /// The argmax of each row of `logits` `[1, seq, vocab]`, taken on the device.
    pub(crate) fn device_argmax(logits: Tensor<B, 3>) -> Tensor<B, 2, Int> {
        let [b, s, _] = logits.dims();
        logits.argmax(2).reshape([b, s])
    }

    /// Token ids `[1, n]` read to the host.
    pub(crate) fn read_ids(&mut self, ids: Tensor<B, 2, Int>) -> Vec<u32> {
        let values = ids.into_data().convert::<i64>();
        let ids: Vec<u32> = values.iter::<i64>().map(|t| t as u32).collect();
        self.count_read(ids.len());
        ids
    }

    fn count_read(&mut self, values: usize) {
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
        let mut row = host_rows(self.draft_logits(hidden, options)?).remove(0);
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
        run: &mut Run<'_>,
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

    /// Autoregressive decoding through layers `0..exit` (the full model when `exit == L`).
    fn decode_loop(
        &mut self,
        run: &mut Run<'_>,
        exit: usize,
        on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
    ) -> Result<()> {
        let mut input = run.tokens.clone();
        let mut pos = 0;
        while run.stop.is_none() {
            let h = self.layers(self.model.embed_ids(&input), 0..exit, pos)?;
            let seq = h.dims()[1];
            let last = h.slice([0..1, seq - 1..seq]);
            let token = if run.options.greedy_on_device() {
                let ids = Self::device_argmax(self.model.exit_head(last));
                self.read_ids(ids)[0]
            } else {
                let row = self.logit_rows(last).remove(0);
                let history = std::mem::take(&mut run.tokens);
                let (token, _) = run.choose(row, &history);
                run.tokens = history;
                token
            };
            self.stats.steps += 1;
            pos += input.len();
            input = vec![token];
            self.emit(run, &[token], on_event);
        }
        Ok(())
    }
}

/// Logits `[batch, seq, n]` (any float dtype) as host rows of `n` f32 values.
fn host_rows<B: LayerSkipBackend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let n = logits.dims()[2];
    let values = logits
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 logits");
    values.chunks(n).map(<[f32]>::to_vec).collect()
}
