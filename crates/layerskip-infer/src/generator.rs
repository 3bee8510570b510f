//! The [`Generator`]: prefill, the decode loop, stop conditions, streaming and timing. Strategies
//! only say how the next tokens are produced.

use std::time::Instant;

use layerskip_model::{KvCache, LayerSkipBackend, LlamaModel};

use crate::context::{DecodeContext, Run, host_rows};
use crate::error::{InferError, Result};
use crate::options::{GenerateOptions, Generation, Strategy, StreamEvent, TokenMargin};
use crate::{adaptive, autoregressive, speculative};

/// Runs generations on one model with one preallocated KV cache (reused across calls).
pub struct Generator<'m, B: LayerSkipBackend> {
    ctx: DecodeContext<'m, B>,
    /// What adaptive self-speculation learned in this generator's earlier generations.
    adaptive: adaptive::Memory,
}

impl<'m, B: LayerSkipBackend> Generator<'m, B> {
    /// A generator whose context holds `capacity` positions (prompt + generation). Prepares
    /// the model's weights for decoding ([`LlamaModel::prepare_for_decoding`]) if they are not
    /// yet (weights prepared quantized stay so).
    pub fn new(model: &'m LlamaModel<B>, capacity: usize) -> Result<Self> {
        prepare(model, capacity)?;
        let cache = KvCache::new(model.config(), 1, capacity, &model.device());
        let ctx = DecodeContext::new(model, cache, capacity);
        let adaptive = adaptive::Memory::new(model.num_layers());
        Ok(Self { ctx, adaptive })
    }

    /// The model.
    pub fn model(&self) -> &LlamaModel<B> {
        self.ctx.model()
    }

    /// The KV cache as the last generation left it.
    pub fn cache(&self) -> &KvCache<B> {
        self.ctx.cache()
    }

    /// Positions the context holds.
    pub fn capacity(&self) -> usize {
        self.ctx.capacity()
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
        let model = self.ctx.model();
        let layers = 0..model.num_layers();
        let hidden = model.forward_layers(model.embed_ids(context), layers, 0, None)?;
        let n = context.len();
        let logits = model.exit_head(hidden.slice([0..1, n - 1..n]));
        Ok(TokenMargin::of(&host_rows(logits)?.remove(0)))
    }

    /// Runs `options`' strategy untimed on two short synthetic prompts (one of a few tokens, one
    /// of 40) for a few tokens, so that a backend that compiles its kernels on first use
    /// (CubeCL: CUDA, wgpu) does it before the first real prompt (weights were prepared by
    /// [`Generator::new`]). For adaptive self-speculation the second runs long enough to time
    /// the steps of its cost design ([`adaptive::CostModel::design`]); its estimates of the
    /// synthetic text's exits are dropped. Returns the milliseconds it took.
    pub fn warm_up(&mut self, options: &GenerateOptions) -> Result<f64> {
        let start = Instant::now();
        let vocab = self.ctx.model().config().vocab_size as u32;
        // The synthetic text neither uses nor changes what earlier generations estimated.
        let remembered = self.adaptive.alpha.take();
        for (len, tokens) in [(3, 4), (40, self.warm_up_tokens(options))] {
            let warm = GenerateOptions {
                max_new_tokens: tokens,
                stop_tokens: Vec::new(),
                ..options.clone()
            };
            let len = len.min(self.capacity().saturating_sub(tokens + 1));
            if len == 0 {
                continue;
            }
            let prompt: Vec<u32> = (0..len as u32).map(|i| (i * 7 + 1) % vocab).collect();
            self.generate(&prompt, &warm, |_| true)?;
        }
        self.adaptive.alpha = remembered;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }

    /// Tokens the longer warm-up generation takes: 4, or for adaptive self-speculation enough
    /// for every step of the cost design (each emits at most its drafts and one token more).
    fn warm_up_tokens(&self, options: &GenerateOptions) -> usize {
        match options.strategy {
            Strategy::Adaptive { max_speculations } => self
                .adaptive
                .cost
                .design(max_speculations)
                .iter()
                .map(|&(_, d)| d + 1)
                .sum::<usize>()
                .max(4),
            _ => 4,
        }
    }

    /// Checks a prompt and options (exit layer range, speculations, sampling, context) without
    /// generating: the error [`Generator::generate`] would return.
    pub fn validate(&self, prompt: &[u32], options: &GenerateOptions) -> Result<()> {
        validate_request(self.ctx.model(), self.capacity(), prompt, options)
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
        self.ctx.begin(prompt.len());
        let layers = self.ctx.model().num_layers();
        let ctx = &mut self.ctx;
        let mut run = Run::new(prompt, options);
        if run.is_running() {
            match options.strategy {
                Strategy::Autoregressive => {
                    autoregressive::decode(ctx, &mut run, layers, &mut on_event)?
                }
                Strategy::EarlyExit { exit_layer } => {
                    autoregressive::decode(ctx, &mut run, exit_layer, &mut on_event)?
                }
                Strategy::SelfSpeculative {
                    exit_layer,
                    speculations,
                } => speculative::decode(ctx, &mut run, (exit_layer, speculations), &mut on_event)?,
                Strategy::Adaptive { max_speculations } => adaptive::decode(
                    ctx,
                    &mut run,
                    max_speculations,
                    &mut self.adaptive,
                    &mut on_event,
                )?,
            }
        }
        Ok(self.ctx.end(run))
    }
}

/// The checks of [`Generator::validate`] for a model and a context of `capacity` positions.
pub(crate) fn validate_request<B: LayerSkipBackend>(
    model: &LlamaModel<B>,
    capacity: usize,
    prompt: &[u32],
    options: &GenerateOptions,
) -> Result<()> {
    let layers = model.num_layers();
    let bad = |m: String| Err(InferError::InvalidArgument(m));
    options.sampling.validate()?;
    if prompt.is_empty() {
        return bad("the prompt is empty".into());
    }
    if let Some(t) = prompt
        .iter()
        .find(|&&t| t as usize >= model.config().vocab_size)
    {
        return bad(format!("prompt token {t} is outside the vocabulary"));
    }
    if prompt.len() >= capacity {
        return Err(InferError::PromptTooLong {
            prompt: prompt.len(),
            capacity,
        });
    }
    let vocab = model.config().vocab_size;
    if let Some(ids) = &options.first_token_among {
        if ids.is_empty() {
            return bad("the first token's allowed ids are empty".into());
        }
        if let Some(t) = ids.iter().find(|&&t| t as usize >= vocab) {
            return bad(format!(
                "first-token id {t} is outside the vocabulary of {vocab} tokens"
            ));
        }
    }
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
        Strategy::EarlyExit { exit_layer: e } | Strategy::SelfSpeculative { exit_layer: e, .. }
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
        Strategy::SelfSpeculative { speculations, .. } if speculations >= capacity => bad(format!(
            "{speculations} speculations do not fit the context of {} positions",
            capacity
        )),
        Strategy::Adaptive { .. } if layers < 2 => bad(format!(
            "adaptive self-speculation needs at least 2 layers (the model has {layers})"
        )),
        Strategy::Adaptive {
            max_speculations: 0,
        } => bad("speculations must be >= 1".into()),
        Strategy::Adaptive { max_speculations } if max_speculations >= capacity => bad(format!(
            "{max_speculations} speculations do not fit the context of {capacity} positions"
        )),
        _ => Ok(()),
    }
}

/// Checks a context capacity against the model and prepares its weights for decoding (kept
/// quantized if they were prepared so): what a [`Generator`] and a [`Batch`](crate::Batch) need.
pub(crate) fn prepare<B: LayerSkipBackend>(model: &LlamaModel<B>, capacity: usize) -> Result<()> {
    let most = model.config().max_position_embeddings;
    if capacity == 0 || capacity > most {
        return Err(InferError::InvalidArgument(format!(
            "context capacity {capacity} must be in 1..={most}"
        )));
    }
    model.prepare_for_decoding(None)?;
    Ok(())
}
