//! Several autoregressive generations decoded together: each [`Batch::step`] takes the next
//! token of every live generation through the model in one pass (one row per generation in the
//! products, attention per generation over its own KV cache), so the weights are read once per
//! step instead of once per generation. A server's concurrent requests join and leave between
//! steps.
//!
//! Each generation is token for token what [`Generator::generate`](crate::Generator::generate)
//! gives for it alone, greedy or sampled: its own cache, random stream and stop conditions, and
//! products that compute each row alone (Flex's and the CubeCL kernels do).

use burn::tensor::Tensor;
use layerskip_model::{KvCache, LayerSkipBackend, LlamaModel};

use crate::context::{DecodeContext, Run, host_rows};
use crate::error::{InferError, Result};
use crate::generator::{prepare, validate_request};
use crate::options::{GenerateOptions, Generation, Strategy, StreamEvent};

/// One live generation: its context (cache, statistics) and state.
struct Sequence<'m, B: LayerSkipBackend> {
    ctx: DecodeContext<'m, B>,
    run: Run,
}

/// Autoregressive generations on one model, decoded a step at a time together.
pub struct Batch<'m, B: LayerSkipBackend> {
    model: &'m LlamaModel<B>,
    capacity: usize,
    max_sequences: usize,
    /// Live generations by slot; a slot is free again once its generation is taken.
    slots: Vec<Option<Sequence<'m, B>>>,
    /// Caches of ended generations, kept for the next ones.
    spare: Vec<KvCache<B>>,
    finished: Vec<(usize, Generation)>,
}

impl<'m, B: LayerSkipBackend> Batch<'m, B> {
    /// A batch of at most `max_sequences` generations, each with a context of `capacity`
    /// positions. Prepares the model's weights for decoding as [`Generator::new`](crate::Generator::new) does.
    pub fn new(model: &'m LlamaModel<B>, capacity: usize, max_sequences: usize) -> Result<Self> {
        if max_sequences == 0 {
            return Err(InferError::InvalidArgument(
                "a batch holds at least one generation".into(),
            ));
        }
        prepare(model, capacity)?;
        Ok(Self {
            model,
            capacity,
            max_sequences,
            slots: Vec::new(),
            spare: Vec::new(),
            finished: Vec::new(),
        })
    }

    /// Live generations.
    pub fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Whether no generation is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether another generation can join.
    pub fn is_full(&self) -> bool {
        self.len() >= self.max_sequences
    }

    /// Whether a generation with these options can join a batch: autoregressive through the
    /// whole model (self-speculation and early exit run a different number of layers per
    /// token, so they decode on their own).
    pub fn batches(options: &GenerateOptions) -> bool {
        options.strategy == Strategy::Autoregressive
    }

    /// Options that batch and give the tokens these give: these themselves where they batch;
    /// for greedy self-speculation (static or adaptive) without history penalties,
    /// autoregressive decoding with the same limits, which decodes exactly its tokens (drafts
    /// only change the speed); `None` for early exit (its own model), sampled self-speculation
    /// (another random stream) and penalised self-speculation. A server can batch such a request
    /// when it would otherwise wait.
    pub fn exact_batched(options: &GenerateOptions) -> Option<GenerateOptions> {
        let exact = match options.strategy {
            Strategy::Autoregressive => true,
            Strategy::SelfSpeculative { .. } | Strategy::Adaptive { .. } => {
                let s = &options.sampling;
                s.is_greedy() && s.repetition_penalty == 1.0 && s.no_repeat_ngram == 0
            }
            Strategy::EarlyExit { .. } => false,
        };
        exact.then(|| GenerateOptions {
            strategy: Strategy::Autoregressive,
            draft_vocab: None,
            draft_confidence: None,
            ..options.clone()
        })
    }

    /// The error [`Batch::admit`] would return for this prompt and options, without generating.
    pub fn validate(&self, prompt: &[u32], options: &GenerateOptions) -> Result<()> {
        validate_request(self.model, self.capacity, prompt, options)?;
        if !Self::batches(options) {
            return Err(InferError::InvalidArgument(format!(
                "only autoregressive generations are batched, not {:?}",
                options.strategy
            )));
        }
        Ok(())
    }

    /// Starts a generation: runs its prompt (alone) and chooses its first token, which
    /// `on_event` sees. Returns its slot, by which [`Batch::step`] and [`Batch::take_finished`]
    /// name it. A generation that ends at once (one new token, a stop token) is finished at
    /// return.
    pub fn admit(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_event: impl FnMut(StreamEvent<'_>) -> bool,
    ) -> Result<usize> {
        self.validate(prompt, options)?;
        if self.is_full() {
            return Err(InferError::InvalidArgument(format!(
                "the batch is full ({} generations)",
                self.max_sequences
            )));
        }
        let model = self.model;
        let cache = self
            .spare
            .pop()
            .unwrap_or_else(|| KvCache::new(model.config(), 1, self.capacity, &model.device()));
        // Autoregressive decoding keeps no exit hidden states.
        let mut ctx = DecodeContext::new(model, cache, 1);
        ctx.begin(prompt.len());
        let mut run = Run::new(prompt, options);
        if run.is_running() {
            let h = ctx.layers(model.embed_ids(prompt), 0..model.num_layers(), 0)?;
            let n = prompt.len();
            let token = ctx.next_token(&mut run, h.slice([0..1, n - 1..n]), true)?;
            ctx.count_step();
            ctx.emit(&mut run, &[token], &mut on_event);
        }
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some(Sequence { ctx, run });
        self.retire(slot);
        Ok(slot)
    }

    /// One token for every live generation, in one pass through the model; `on_event` sees
    /// each generation's token with its slot and returns `false` to end that generation. On an
    /// error every live generation is dropped (the batch is empty afterwards).
    pub fn step(&mut self, mut on_event: impl FnMut(usize, StreamEvent<'_>) -> bool) -> Result<()> {
        let live: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_some())
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let result = self.decode(&live, &mut on_event);
        if result.is_err() {
            for slot in &live {
                if let Some(sequence) = self.slots[*slot].take() {
                    self.spare.push(sequence.ctx.into_cache());
                }
            }
        }
        result
    }

    fn decode(
        &mut self,
        live: &[usize],
        on_event: &mut impl FnMut(usize, StreamEvent<'_>) -> bool,
    ) -> Result<()> {
        let model = self.model;
        let layers = model.num_layers();
        let mut sequences: Vec<&mut Sequence<'m, B>> = self.slots.iter_mut().flatten().collect();
        let ids: Vec<u32> = sequences
            .iter()
            .map(|s| *s.run.tokens().last().expect("a live generation has tokens"))
            .collect();
        let n = ids.len();
        let x = model
            .embed_ids(&ids)
            .reshape([n, 1, model.config().hidden_size]);
        let mut caches: Vec<&mut KvCache<B>> =
            sequences.iter_mut().map(|s| s.ctx.cache_mut()).collect();
        let h = model.forward_layers_each(x, 0..layers, &mut caches)?;
        let logits = model.exit_head(h);
        // Greedy generations read their token ids, the others their logit rows.
        let greedy: Vec<usize> = (0..n)
            .filter(|&i| sequences[i].run.greedy_on_device())
            .collect();
        let mut tokens = vec![0u32; n];
        if !greedy.is_empty() {
            let rows = select(logits.clone(), &greedy, n);
            let values = sequences[greedy[0]]
                .ctx
                .read_ids(DecodeContext::<B>::device_argmax(rows))?;
            for (&i, t) in greedy.iter().zip(values) {
                tokens[i] = t;
            }
        }
        let sampled: Vec<usize> = (0..n).filter(|i| !greedy.contains(i)).collect();
        if !sampled.is_empty() {
            let rows = host_rows(select(logits, &sampled, n))?;
            sequences[sampled[0]]
                .ctx
                .count_read(rows.len() * rows.first().map_or(0, Vec::len));
            for (&i, row) in sampled.iter().zip(rows) {
                tokens[i] = sequences[i].run.choose_next(row);
            }
        }
        for (i, sequence) in sequences.iter_mut().enumerate() {
            let ctx = &mut sequence.ctx;
            ctx.count_positions(0..layers, sequence.run.newest(), 1);
            ctx.count_step();
            let slot = live[i];
            ctx.emit(&mut sequence.run, &[tokens[i]], &mut |event| {
                on_event(slot, event)
            });
        }
        drop(sequences);
        for &slot in live {
            self.retire(slot);
        }
        Ok(())
    }

    /// Moves the generation in `slot` to the finished ones if it has stopped.
    fn retire(&mut self, slot: usize) {
        if self.slots[slot].as_ref().is_none_or(|s| s.run.is_running()) {
            return;
        }
        let Sequence { mut ctx, run } = self.slots[slot].take().expect("checked above");
        let generation = ctx.end(run);
        self.spare.push(ctx.into_cache());
        self.finished.push((slot, generation));
    }

    /// The generations that have ended since the last call, with their slots (free again now).
    pub fn take_finished(&mut self) -> Vec<(usize, Generation)> {
        std::mem::take(&mut self.finished)
    }
}

/// Rows `rows` of `logits` `[n, 1, vocab]` (all of it when that is every row).
fn select<B: LayerSkipBackend>(logits: Tensor<B, 3>, rows: &[usize], n: usize) -> Tensor<B, 3> {
    if rows.len() == n {
        return logits;
    }
    let parts = rows
        .iter()
        .map(|&i| logits.clone().slice_dim(0, i..i + 1))
        .collect();
    Tensor::cat(parts, 0)
}
