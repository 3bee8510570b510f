//! The Llama decoder with the LayerSkip surface: run any contiguous range of layers, apply the
//! shared exit head to any layer's output, and train with per-sequence layer skipping.

use std::ops::Range;

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::{Linear, RmsNorm};
use burn::tensor::IndexingUpdateOp;
use burn::tensor::{Distribution, FloatDType, Int, Tensor, TensorData, backend::Backend};

use crate::cache::{KvCache, LayerKvCache};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::layer::{DecoderLayer, init_linear, init_rms_norm, weight};
use crate::ops::{Head, LayerSkipBackend, Packed, Quantization, WeightLayout};
use crate::rope::{Rope, RopeTables};

/// A Llama causal language model. It holds parameters only: caches and positions are passed in,
/// and generation and losses live in the `layerskip-infer` and `layerskip-train` crates.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// Token embedding `[vocab, hidden]`.
    pub(crate) embed_tokens: Param<Tensor<B, 2>>,
    /// The decoder layers `0..L`.
    pub(crate) layers: Vec<DecoderLayer<B>>,
    /// The final RMSNorm, the first half of the shared exit head.
    pub(crate) norm: RmsNorm<B>,
    /// The LM head `[hidden, vocab]`; `None` when tied to the embedding.
    pub(crate) lm_head: Option<Linear<B>>,
    #[module(skip)]
    config: LlamaConfig,
    #[module(skip)]
    rope: Rope,
    /// The backend's state for the LM head (or the tied embedding read as one).
    #[module(skip)]
    head_packed: Packed,
    /// The products' weights live only in the backend's state ([`LlamaModel::into_decoding_only`]).
    #[module(skip)]
    decoding_only: bool,
}

/// Which sequences of a batch skip which layers (layer dropout as a mechanism; the policy that
/// draws the mask lives in `layerskip-train`).
///
/// `skip[l][b]` is true when sequence `b` passes through layer `l` unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct SkipMask {
    /// One row per layer, one entry per sequence.
    pub skip: Vec<Vec<bool>>,
}

/// What the training forward returns.
#[derive(Debug, Clone)]
pub struct TrainOutput<B: Backend> {
    /// `(l, x_{l+1})` for each requested exit layer `l`, in increasing order: the residual stream
    /// after layer `l`, `[batch, seq, hidden]`, ready for [`LlamaModel::exit_head`].
    pub exit_hidden: Vec<(usize, Tensor<B, 3>)>,
    /// Logits of the full model `[batch, seq, vocab]`.
    pub logits: Tensor<B, 3>,
}

/// What [`LlamaModel::forward_train_hidden`] returns: hidden states, no logits.
#[derive(Debug, Clone)]
pub struct TrainHidden<B: Backend> {
    /// `(l, x_{l+1})` for each requested exit layer `l`, as in [`TrainOutput::exit_hidden`].
    pub exit_hidden: Vec<(usize, Tensor<B, 3>)>,
    /// The last layer's output `x_L` `[batch, seq, hidden]`, before the final norm.
    pub last: Tensor<B, 3>,
}

impl<B: Backend> LlamaModel<B> {
    /// A randomly initialised model (weights ~ N(0, 0.02²), as Hugging Face initialises Llama).
    /// Seed the backend (`B::seed`) first for a reproducible model.
    pub fn init(config: &LlamaConfig, device: &B::Device) -> Result<Self> {
        Self::init_with_std(config, 0.02, device)
    }

    /// A randomly initialised model with weights ~ N(0, std²) (norm gains 1).
    pub fn init_with_std(config: &LlamaConfig, std: f64, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let embed = Tensor::random(
            [config.vocab_size, config.hidden_size],
            Distribution::Normal(0.0, std),
            device,
        );
        let layers = (0..config.num_layers)
            .map(|_| DecoderLayer::init(config, std, device))
            .collect();
        let lm_head = (!config.tie_word_embeddings)
            .then(|| init_linear(config.hidden_size, config.vocab_size, std, device));
        Ok(Self::from_parts(
            Param::from_tensor(embed),
            layers,
            init_rms_norm(config, device),
            lm_head,
            config.clone(),
        ))
    }

    pub(crate) fn from_parts(
        embed_tokens: Param<Tensor<B, 2>>,
        layers: Vec<DecoderLayer<B>>,
        norm: RmsNorm<B>,
        lm_head: Option<Linear<B>>,
        config: LlamaConfig,
    ) -> Self {
        let rope = Rope::new(&config.rope, config.head_dim);
        Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config,
            rope,
            head_packed: Default::default(),
            decoding_only: false,
        }
    }

    /// The backend's state for the head, made while loading.
    pub(crate) fn set_head_packed(&mut self, packed: Packed) {
        self.head_packed = packed;
    }

    /// Whether the model is for decoding only ([`LlamaModel::into_decoding_only`]).
    pub fn is_decoding_only(&self) -> bool {
        self.decoding_only
    }

    /// The token embedding `[vocab, hidden]` (read as the LM head too when tied).
    pub fn embed_tokens(&self) -> &Param<Tensor<B, 2>> {
        &self.embed_tokens
    }

    /// The decoder layers `0..L`.
    pub fn layers(&self) -> &[DecoderLayer<B>] {
        &self.layers
    }

    /// The final RMSNorm, the first half of the shared exit head.
    pub fn norm(&self) -> &RmsNorm<B> {
        &self.norm
    }

    /// The LM head `[hidden, vocab]`; `None` when tied to the embedding.
    pub fn lm_head(&self) -> Option<&Linear<B>> {
        self.lm_head.as_ref()
    }

    /// The configuration this model was built from.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Number of decoder layers `L`.
    pub fn num_layers(&self) -> usize {
        self.config.num_layers
    }

    /// The rotary tables for positions `start..start + len`, in the weights' dtype.
    pub fn rope_tables(&self, start: usize, len: usize) -> RopeTables<B> {
        let tables = self.rope.tables(start, len, &self.embed_tokens.device());
        let dtype = self.embed_tokens.val().dtype();
        if tables.cos.dtype() == dtype {
            return tables;
        }
        // The embedding is a float parameter, so its dtype converts.
        let float: FloatDType = dtype.into();
        RopeTables {
            cos: tables.cos.cast(float),
            sin: tables.sin.cast(float),
        }
    }

    /// The device the model's weights are on.
    pub fn device(&self) -> B::Device {
        self.embed_tokens.device()
    }

    /// This model with every product of `Autodiff<B>` rounding its operands to bf16 and
    /// accumulating in f32 (mixed precision with the tensors left f32), where the backend has
    /// such products ([`LayerSkipBackend::bf16_products`]); other products are unchanged.
    pub fn with_bf16_products(mut self) -> Self {
        for layer in &mut self.layers {
            for packed in layer
                .self_attn
                .packed
                .iter_mut()
                .chain(&mut layer.mlp.packed)
            {
                packed.bf16_products = true;
            }
        }
        self.head_packed.bf16_products = true;
        self
    }

    /// A copy whose float parameters are cast to `dtype`, keeping parameter ids. Under an
    /// autodiff backend the cast is part of the graph, so this is the compute copy of mixed
    /// precision: forward and backward run in `dtype`, and the gradients arrive at the original
    /// (f32 master) parameters in their dtype.
    pub fn cast(&self, dtype: FloatDType) -> Self {
        assert!(
            !self.decoding_only,
            "a decoding-only model cannot be cast: its weights live in the backend's packed state"
        );
        struct Cast(FloatDType);
        impl<B: Backend> ModuleMapper<B> for Cast {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let dtype = self.0;
                param.map(|t| t.cast(dtype))
            }
        }
        self.clone().map(&mut Cast(dtype))
    }

    /// The element-wise mean of the weights of `models` (checkpoint averaging: the last few
    /// checkpoints of a run, averaged, usually predict better than the last alone, most of all
    /// while the learning rate is still high). Every model must have the same configuration;
    /// the result is as loaded (nothing prepared for decoding). Refused for no models, for
    /// differing configurations, and for a decoding-only model (its weights are not here).
    pub fn average(models: Vec<Self>) -> Result<Self> {
        use burn::module::ModuleVisitor;
        let Some(first) = models.first() else {
            return Err(ModelError::InvalidConfig("no models to average".into()));
        };
        if let Some(i) = models.iter().position(|m| m.config != first.config) {
            return Err(ModelError::InvalidConfig(format!(
                "models to average must have the same configuration: model {} differs from the first",
                i + 1
            )));
        }
        if models.iter().any(|m| m.decoding_only) {
            return Err(ModelError::Unsupported(
                "a decoding-only model cannot be averaged: its weights are not loaded".into(),
            ));
        }
        /// Every float parameter of a model, flattened, in the module's order.
        struct Collect<B: Backend>(Vec<Tensor<B, 1>>);
        impl<B: Backend> ModuleVisitor<B> for Collect<B> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                self.0.push(param.val().flatten(0, D - 1));
            }
        }
        /// Each parameter replaced by (itself + the sum of the others) / n, in the same order.
        struct Mean<B: Backend> {
            others: std::vec::IntoIter<Tensor<B, 1>>,
            n: f32,
        }
        impl<B: Backend> ModuleMapper<B> for Mean<B> {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let sum = self.others.next().expect("the same architecture");
                let n = self.n;
                param.map(|t| {
                    let shape = t.shape();
                    (t + sum.reshape(shape)) / n
                })
            }
        }
        let n = models.len() as f32;
        let mut models = models.into_iter();
        let first = models.next().expect("checked above");
        let mut sum: Option<Vec<Tensor<B, 1>>> = None;
        for m in models {
            let mut collect = Collect(Vec::new());
            m.visit(&mut collect);
            sum = Some(match sum {
                None => collect.0,
                Some(s) => s.into_iter().zip(collect.0).map(|(a, b)| a + b).collect(),
            });
        }
        let Some(sum) = sum else {
            return Ok(first);
        };
        let mut mean = first.map(&mut Mean {
            others: sum.into_iter(),
            n,
        });
        // Any backend state prepared from the first model's weights no longer holds.
        mean.head_packed = Packed::default();
        for layer in &mut mean.layers {
            layer.self_attn.packed = Default::default();
            layer.mlp.packed = Default::default();
        }
        Ok(mean)
    }

    /// The same model with its vocabulary renumbered: token `t` of the result is token
    /// `old_ids[t]` of this one (the embedding's rows and an untied head's columns gathered), so
    /// that it computes the same logits in the new order. Putting the most frequent tokens
    /// first makes a draft vocabulary (the ids `0..n`) hold them. Refused unless `old_ids` is a
    /// permutation of the vocabulary, and for a decoding-only model (its weights are not here).
    pub fn reorder_vocab(mut self, old_ids: &[usize]) -> Result<Self> {
        let vocab = self.config.vocab_size;
        let mut seen = vec![false; vocab];
        let permutation = old_ids.len() == vocab
            && old_ids
                .iter()
                .all(|&id| id < vocab && !std::mem::replace(&mut seen[id], true));
        if !permutation {
            return Err(ModelError::InvalidConfig(format!(
                "a vocabulary order must list each of the {vocab} token ids once ({} given)",
                old_ids.len()
            )));
        }
        if self.decoding_only {
            return Err(ModelError::Unsupported(
                "a decoding-only model cannot be reordered: its weights are not loaded".into(),
            ));
        }
        let device = self.embed_tokens.device();
        let ids: Vec<i64> = old_ids.iter().map(|&id| id as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [vocab]), &device);
        self.embed_tokens = self.embed_tokens.map(|w| w.select(0, ids.clone()));
        if let Some(head) = &mut self.lm_head {
            head.weight = head.weight.clone().map(|w| w.select(1, ids));
        }
        // A prepared head holds the old order.
        self.head_packed = Packed::default();
        Ok(self)
    }
}

impl<B: LayerSkipBackend> LlamaModel<B> {
    /// Token ids to the residual stream `x_0`.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        // A tied embedding is also the head, whose backend state may be its only copy.
        let head = self.lm_head.is_none().then_some(&self.head_packed);
        B::embed_rows(self.embed_tokens.val(), head, tokens)
    }

    /// Token ids (as a slice) to `x_0` for a batch of one.
    pub fn embed_ids(&self, ids: &[u32]) -> Tensor<B, 3> {
        let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let device = self.embed_tokens.device();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, ids.len()]), &device);
        self.embed(tokens)
    }

    /// The shared exit head, final RMSNorm then LM head, applied to any layer's output.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]` -> `[batch, seq, vocab]`
    pub fn exit_head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let vocab = self.config.vocab_size;
        self.head_over(hidden, vocab)
    }

    /// The shared exit head over the token ids `0..vocab` only, `[batch, seq, hidden]` ->
    /// `[batch, seq, vocab]`: the first `vocab` columns of [`exit_head`](Self::exit_head) (bit
    /// for bit on Flex f32, where both use the same per-output sums).
    ///
    /// A byte-level BPE vocabulary numbers its merges by frequency, so its first ids cover most
    /// text (on the default model 99.5% of generated code tokens have ids < 1024 of 4096): a
    /// self-speculative draft over them costs a quarter of the head. A tied head reads a prefix
    /// view of the embedding; an untied one copies its column slice on each call.
    pub fn exit_head_prefix(&self, hidden: Tensor<B, 3>, vocab: usize) -> Result<Tensor<B, 3>> {
        let vocab_size = self.config.vocab_size;
        if vocab == 0 || vocab > vocab_size {
            return Err(ModelError::VocabPrefix {
                requested: vocab,
                vocab_size,
            });
        }
        Ok(self.head_over(hidden, vocab))
    }

    /// Makes the backend's state for every weight the decode path reads (on Flex, the packed
    /// copies of the row kernels, packed in parallel) now instead of on first use, so that
    /// the first generated token is as fast as the next. Idempotent: weights already prepared
    /// are skipped. Costs memory only on backends that keep such state (Flex: the weights'
    /// size again, half of it for bfloat16-valued weights, 0.28 of it in Q8_0).
    ///
    /// With `quantize`, the decode path computes with the weights in that format from then on
    /// (on Flex: products of up to `ops::flex::MAX_ROWS` rows; longer inputs, as in training
    /// and batched evaluation, still read the full-precision tensors). Backends without
    /// quantized kernels refuse it.
    pub fn prepare_for_decoding(&self, quantize: Option<Quantization>) -> Result<()> {
        for layer in &self.layers {
            layer.prepare(quantize)?;
        }
        self.prepare_head(quantize)
    }

    /// Prepares the head: an untied head's weight, or the tied embedding read as the head.
    fn prepare_head(&self, quantize: Option<Quantization>) -> Result<()> {
        match &self.lm_head {
            Some(head) => B::prepare(
                weight(head),
                WeightLayout::InOut,
                quantize,
                &self.head_packed,
            ),
            None => B::prepare(
                self.embed_tokens.val(),
                WeightLayout::OutIn,
                quantize,
                &self.head_packed,
            ),
        }
    }

    /// The model for decoding only: prepares the weights (as
    /// [`LlamaModel::prepare_for_decoding`] with `quantize`, in a state of its own), then frees the loaded copy of every weight whose prepared state the
    /// backend computes all its products from ([`LayerSkipBackend::release`]; on the CPU the
    /// packed, possibly quantized, copy), keeping a stand-in of its shape. What decoding
    /// computes does not change; a model of f32 weights holds them once instead of twice.
    /// A tied embedding is released too where the backend reads its rows from the head's state
    /// ([`LayerSkipBackend::embed_rows`]). Saving, casting and training such a model are
    /// refused; other clones of the model keep their weights and their own prepared state.
    pub fn into_decoding_only(mut self, quantize: Option<Quantization>) -> Result<Self> {
        if self.decoding_only {
            return Ok(self);
        }
        for layer in &mut self.layers {
            layer.release_for_decoding(quantize)?;
        }
        self.release_head_for_decoding(quantize, true)?;
        Ok(self)
    }

    /// The head's part of [`LlamaModel::into_decoding_only`], once every layer's is done: the
    /// head prepared, an untied head's loaded copy released, the model marked.
    /// `detach`: give the head a state of its own first (not when the loader just made it).
    pub(crate) fn release_head_for_decoding(
        &mut self,
        quantize: Option<Quantization>,
        detach: bool,
    ) -> Result<()> {
        if detach {
            self.head_packed = self.head_packed.detached();
        }
        self.prepare_head(quantize)?;
        if let Some(head) = &mut self.lm_head {
            release_weight(head, &self.head_packed);
        } else if let Some(stand_in) = B::release(self.embed_tokens.val(), &self.head_packed) {
            // Token lookup reads the rows from the head's state from now on.
            self.embed_tokens = self.embed_tokens.clone().map(|_| stand_in);
        }
        self.decoding_only = true;
        Ok(())
    }

    /// The training loss of one exit: the cross-entropy of the shared exit head's logits on
    /// `hidden` (a layer's output, before the final norm) against `targets`, each position
    /// weighted by `weights` (the loss mask over its count gives the masked mean), through the
    /// backend's fused kernel where it has one (the logits are then never held whole).
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]`; `targets`, `weights`: `[batch, seq]` -> `[1]`
    pub fn exit_cross_entropy(
        &self,
        hidden: Tensor<B, 3>,
        targets: Tensor<B, 2, Int>,
        weights: Tensor<B, 2>,
    ) -> Tensor<B, 1> {
        let [b, s, h] = hidden.dims();
        let normed = B::rms_norm(&self.norm, hidden).reshape([b * s, h]);
        B::exit_cross_entropy(
            normed,
            self.head(),
            &self.head_packed,
            targets.reshape([b * s]),
            weights.reshape([b * s]),
        )
    }

    fn head(&self) -> Head<B> {
        match &self.lm_head {
            Some(head) => Head::Untied(weight(head)),
            None => Head::Tied(self.embed_tokens.val()),
        }
    }

    /// The exit head's first `vocab` logits.
    fn head_over(&self, hidden: Tensor<B, 3>, vocab: usize) -> Tensor<B, 3> {
        B::exit_logits(hidden, &self.norm, self.head(), &self.head_packed, vocab)
    }

    /// Runs layers `range` over all positions of `hidden`, whose first position is `start_pos`.
    /// With a cache, each layer's new keys/values are appended to its own cache, whose length
    /// must equal `start_pos` (an error otherwise). Returns every position (verification needs them all).
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward_layers(
        &self,
        hidden: Tensor<B, 3>,
        range: Range<usize>,
        start_pos: usize,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        self.check_range(&range)?;
        let seq = hidden.dims()[1];
        let end = start_pos + seq;
        if end > self.config.max_position_embeddings {
            return Err(ModelError::ContextOverflow {
                requested: end,
                capacity: self.config.max_position_embeddings,
            });
        }
        let rope = self.rope_tables(start_pos, seq);
        let mut x = hidden;
        for l in range {
            let layer_cache = match cache.as_deref_mut() {
                Some(c) if c.len(l) != start_pos => {
                    return Err(ModelError::CachePosition {
                        layer: l,
                        held: c.len(l),
                        start: start_pos,
                    });
                }
                Some(c) => Some(c.layer_mut(l)),
                None => None,
            };
            x = self.layers[l].forward(x, &rope, layer_cache)?;
        }
        Ok(x)
    }

    /// Runs layers `range` over one new position of each of several sequences, sequence `i`
    /// with its own cache `caches[i]`, at the position after the ones that cache holds (the
    /// same in every layer of `range`, an error otherwise). The products take all sequences'
    /// rows in one pass (the decode step of a batch of requests); each row is what
    /// [`LlamaModel::forward_layers`] gives for its sequence alone on backends whose products
    /// compute each row alone (Flex's and the CubeCL kernels).
    ///
    /// # Shapes
    /// - `hidden`: `[sequences, 1, hidden]` -> `[sequences, 1, hidden]`
    pub fn forward_layers_each(
        &self,
        hidden: Tensor<B, 3>,
        range: Range<usize>,
        caches: &mut [&mut KvCache<B>],
    ) -> Result<Tensor<B, 3>> {
        self.check_range(&range)?;
        let [n, seq, _] = hidden.dims();
        if seq != 1 || n != caches.len() {
            return Err(ModelError::Unsupported(format!(
                "forward_layers_each takes one position of each of {} sequences, got [{n}, {seq}, _]",
                caches.len()
            )));
        }
        let mut ropes = Vec::with_capacity(n);
        for cache in caches.iter() {
            let start = cache.len(range.start);
            let capacity = self.config.max_position_embeddings.min(cache.capacity());
            if start + 1 > capacity {
                return Err(ModelError::ContextOverflow {
                    requested: start + 1,
                    capacity,
                });
            }
            if let Some(l) = range.clone().find(|&l| cache.len(l) != start) {
                return Err(ModelError::CachePosition {
                    layer: l,
                    held: cache.len(l),
                    start,
                });
            }
            ropes.push(self.rope_tables(start, 1));
        }
        let mut x = hidden;
        for l in range {
            let mut layers: Vec<&mut LayerKvCache<B>> =
                caches.iter_mut().map(|c| c.layer_mut(l)).collect();
            x = self.layers[l].forward_each(x, &ropes, &mut layers)?;
        }
        Ok(x)
    }

    /// The full model: embedding, all layers, exit head.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` -> logits `[batch, seq, vocab]`
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        start_pos: usize,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        let x = self.forward_layers(self.embed(tokens), 0..self.num_layers(), start_pos, cache)?;
        Ok(self.exit_head(x))
    }

    /// The training forward (no cache): returns `x_{l+1}` for each layer `l` in `exit_layers` and
    /// the final logits. With `skip`, a sequence marked for layer `l` passes through it unchanged
    /// (no rescaling) and its row is not computed: only the kept rows go through the layer.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]`; `skip.skip`: `[num_layers][batch]`
    pub fn forward_train(
        &self,
        tokens: Tensor<B, 2, Int>,
        exit_layers: &[usize],
        skip: Option<&SkipMask>,
    ) -> Result<TrainOutput<B>> {
        let TrainHidden { exit_hidden, last } =
            self.forward_train_hidden(tokens, exit_layers, skip)?;
        Ok(TrainOutput {
            exit_hidden,
            logits: self.exit_head(last),
        })
    }

    /// [`forward_train`](Self::forward_train) without the final logits: the requested exits'
    /// hidden states and the last layer's output `x_L` (before the final norm), for losses that
    /// apply the head themselves ([`exit_cross_entropy`](Self::exit_cross_entropy)).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` -> each hidden state `[batch, seq, hidden]`
    pub fn forward_train_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        exit_layers: &[usize],
        skip: Option<&SkipMask>,
    ) -> Result<TrainHidden<B>> {
        if self.decoding_only {
            return Err(ModelError::Unsupported(
                "a decoding-only model cannot be trained: load the checkpoint again".into(),
            ));
        }
        let [batch, seq] = tokens.dims();
        if let Some(&bad) = exit_layers.iter().find(|&&l| l >= self.num_layers()) {
            return Err(ModelError::LayerRange {
                start: bad,
                end: bad + 1,
                num_layers: self.num_layers(),
            });
        }
        if let Some(mask) = skip {
            let ok = mask.skip.len() == self.num_layers()
                && mask.skip.iter().all(|row| row.len() == batch);
            if !ok {
                return Err(ModelError::InvalidConfig(format!(
                    "skip mask must be [{} layers][{batch} sequences]",
                    self.num_layers()
                )));
            }
        }
        let rope = self.rope_tables(0, seq);
        let mut x = self.embed(tokens);
        let mut exit_hidden = Vec::with_capacity(exit_layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let row_skip = skip.map(|m| m.skip[l].as_slice());
            x = self.skippable_layer(layer, x, &rope, row_skip)?;
            if exit_layers.contains(&l) {
                exit_hidden.push((l, x.clone()));
            }
        }
        Ok(TrainHidden {
            exit_hidden,
            last: x,
        })
    }

    /// Applies `layer` to the rows not marked in `skip`; the others pass through unchanged.
    fn skippable_layer(
        &self,
        layer: &DecoderLayer<B>,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        skip: Option<&[bool]>,
    ) -> Result<Tensor<B, 3>> {
        let keep: Vec<i64> = match skip {
            None => return layer.forward(x, rope, None),
            Some(skip) => (0..skip.len() as i64)
                .filter(|&b| !skip[b as usize])
                .collect(),
        };
        if keep.len() == x.dims()[0] {
            return layer.forward(x, rope, None);
        }
        if keep.is_empty() {
            return Ok(x);
        }
        let device = x.device();
        let idx =
            Tensor::<B, 1, Int>::from_data(TensorData::new(keep.clone(), [keep.len()]), &device);
        let rows = x.clone().select(0, idx.clone());
        let delta = layer.forward(rows.clone(), rope, None)? - rows;
        // Add the layer's update to the kept rows (backends implement the additive scatter;
        // skipped rows receive nothing and stay bit-identical).
        Ok(x.select_assign(0, idx, delta, IndexingUpdateOp::Add))
    }

    fn check_range(&self, range: &Range<usize>) -> Result<()> {
        if range.start > range.end || range.end > self.num_layers() {
            return Err(ModelError::LayerRange {
                start: range.start,
                end: range.end,
                num_layers: self.num_layers(),
            });
        }
        Ok(())
    }
}

/// Replaces `linear`'s weight by the backend's stand-in where its prepared state computes every
/// product ([`LayerSkipBackend::release`]), freeing the loaded copy.
pub(crate) fn release_weight<B: LayerSkipBackend>(linear: &mut Linear<B>, packed: &Packed) {
    if let Some(stand_in) = B::release(weight(linear), packed) {
        linear.weight = linear.weight.clone().map(|_| stand_in);
    }
}

impl<B: LayerSkipBackend> DecoderLayer<B> {
    /// Prepares the layer's seven weights for decoding (quantized if asked) and releases their
    /// loaded copies ([`release_weight`]).
    pub(crate) fn release_for_decoding(&mut self, quantize: Option<Quantization>) -> Result<()> {
        for packed in self.self_attn.packed.iter_mut().chain(&mut self.mlp.packed) {
            *packed = packed.detached();
        }
        self.prepare(quantize)?;
        for (linear, packed) in self.linears_mut() {
            release_weight(linear, packed);
        }
        Ok(())
    }

    /// Prepares the layer's seven weights for decoding (quantized if asked).
    fn prepare(&self, quantize: Option<Quantization>) -> Result<()> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let linears = [
            (&a.q_proj, &a.packed[0]),
            (&a.k_proj, &a.packed[1]),
            (&a.v_proj, &a.packed[2]),
            (&a.o_proj, &a.packed[3]),
            (&m.gate_proj, &m.packed[0]),
            (&m.up_proj, &m.packed[1]),
            (&m.down_proj, &m.packed[2]),
        ];
        for (linear, packed) in linears {
            B::prepare(weight(linear), WeightLayout::InOut, quantize, packed)?;
        }
        Ok(())
    }

    /// The layer's seven weights, each with its backend state.
    fn linears_mut(&mut self) -> [(&mut Linear<B>, &Packed); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            (&mut a.q_proj, &a.packed[0]),
            (&mut a.k_proj, &a.packed[1]),
            (&mut a.v_proj, &a.packed[2]),
            (&mut a.o_proj, &a.packed[3]),
            (&mut m.gate_proj, &m.packed[0]),
            (&mut m.up_proj, &m.packed[1]),
            (&mut m.down_proj, &m.packed[2]),
        ]
    }
}
