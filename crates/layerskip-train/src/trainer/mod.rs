//! The training loop: layer dropout + early-exit loss, AdamW with warm-up and cosine decay,
//! gradient clipping and accumulation, per-exit evaluation, and checkpoints that resume exactly.
//!
//! Every random choice (data order, dropout draws) is a pure function of (seed, step), and a
//! checkpoint holds the model with its parameter ids and the optimizer state, so N steps straight
//! and N/2 + resume + N/2 give the same weights bit for bit.

use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, Optimizer};
use burn::tensor::{DType, ElementConversion, FloatDType};
use layerskip_model::{LlamaModel, SkipMask};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{MixedPrecision, TrainConfig};
use crate::data::Blocks;
use crate::distributed::{Cluster, ClusterConfig, Fingerprint, number_params};
use crate::error::{Result, TrainError};
use crate::loss::masked_cross_entropy;
use crate::schedule::{loss_weights, parse_layers};

mod checkpoint;
mod parallel;

pub use checkpoint::saved_config;
use parallel::{Shard, StepPlan, shard_output};

type Adam<B> = OptimizerAdaptor<AdamW, LlamaModel<B>, B>;

/// What one optimizer step did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    /// The step just taken (0-based).
    pub step: usize,
    /// Learning rate used.
    pub lr: f64,
    /// The early-exit loss `J`, averaged over micro-batches.
    pub loss: f64,
    /// `(layer, weight, cross-entropy)` of each enabled exit (last micro-batch).
    pub per_layer: Vec<(usize, f64, f64)>,
    /// Fraction of (layer, sequence) pairs skipped by layer dropout.
    pub skipped_fraction: f64,
    /// Tokens processed.
    pub tokens: usize,
}

/// Held-out loss at every exit layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Step at which it was measured.
    pub step: usize,
    /// Mean cross-entropy of exit `l` (the head on `x_{l+1}`), `l = 0..L`.
    pub loss: Vec<f64>,
}

/// A training run in progress.
pub struct Trainer<B: crate::TrainBackend> {
    config: TrainConfig,
    model: LlamaModel<B>,
    optim: Adam<B>,
    train: Blocks,
    eval: Blocks,
    step: usize,
    evals: Vec<EvalReport>,
    device: B::Device,
    /// Data-parallel devices (the first is `device`); empty for single-device training.
    replicas: Vec<B::Device>,
    /// The other processes of a multi-node run, if any.
    cluster: Option<Cluster<B::InnerBackend>>,
}

fn optimizer<B: crate::TrainBackend>(config: &TrainConfig) -> Adam<B> {
    let clip = (config.optim.grad_clip > 0.0)
        .then_some(GradientClippingConfig::Norm(config.optim.grad_clip as f32));
    AdamWConfig::new()
        .with_weight_decay(config.optim.weight_decay as f32)
        .with_grad_clipping(clip)
        .init()
}

/// The model the forward pass runs on: the master model itself, or for mixed precision the
/// master model with bf16 products where the backend has them (operands rounded to bf16 as the
/// products read them, everything else f32), else its bf16 cast (the cast is in the autodiff
/// graph, so gradients reach the f32 master weights).
fn compute_copy<B: crate::TrainBackend>(
    model: &LlamaModel<B>,
    precision: MixedPrecision,
) -> LlamaModel<B> {
    match precision {
        MixedPrecision::Off => model.clone(),
        MixedPrecision::Bf16 if B::bf16_products() => model.clone().with_bf16_products(),
        MixedPrecision::Bf16 => model.cast(FloatDType::BF16),
    }
}

/// Per-sequence Bernoulli draws: `skip[l][b]` with probability `rates[l]`.
pub fn draw_skip_mask(rates: &[f64], batch: usize, rng: &mut impl Rng) -> SkipMask {
    SkipMask {
        skip: rates
            .iter()
            .map(|&p| {
                (0..batch)
                    .map(|_| p > 0.0 && rng.random::<f64>() < p)
                    .collect()
            })
            .collect(),
    }
}

impl<B: crate::TrainBackend> Trainer<B> {
    /// Starts a run from `model` (fresh or pretrained).
    pub fn new(
        config: TrainConfig,
        model: LlamaModel<B>,
        train: Blocks,
        eval: Blocks,
        device: B::Device,
    ) -> Result<Self> {
        config.validate_basic()?;
        config.validate_for(model.num_layers())?;
        if config.optim.mixed_precision == MixedPrecision::Bf16
            && !B::supports_dtype(&device, DType::BF16)
        {
            return Err(TrainError::Config(
                "optim.mixed_precision = \"bf16\": this device cannot compute in bf16".into(),
            ));
        }
        let positions = model.config().max_position_embeddings;
        if config.data.seq_len > positions {
            return Err(TrainError::Config(format!(
                "data.seq_len = {} is longer than the model's context (max_position_embeddings = {positions})",
                config.data.seq_len
            )));
        }
        let held_out_needed = config.data.eval_fraction > 0.0;
        if train.is_empty() || (held_out_needed && eval.is_empty()) {
            return Err(TrainError::Data(format!(
                "{} training and {} held-out blocks of {} tokens: need at least one of each \
                 (data.eval_fraction = 0 trains without held-out text)",
                train.len(),
                eval.len(),
                config.data.seq_len + 1
            )));
        }
        let optim = optimizer::<B>(&config);
        Ok(Self {
            config,
            model,
            optim,
            train,
            eval,
            step: 0,
            evals: Vec::new(),
            device,
            replicas: Vec::new(),
            cluster: None,
        })
    }

    /// Trains data-parallel on `devices` (the first must be the trainer's device) through Burn's
    /// multi-device optimizer step: every micro-batch is split into equal shards, one per device;
    /// each device runs forward and backward on a replica of the model in its own thread; the
    /// optimizer sums the shards' gradients (`Optimizer::step_multi`, each parameter accumulated
    /// on one device chosen by its id) and updates the model once. Each shard's loss is scaled by
    /// its share of the micro-batch's loss tokens, so the summed gradient is the full batch's:
    /// the result equals single-device training up to float summation order.
    ///
    /// `batch_size` must be divisible by the number of devices. One device is plain training.
    pub fn with_data_parallel(mut self, devices: Vec<B::Device>) -> Result<Self> {
        let n = devices.len();
        if n == 0 {
            return Err(TrainError::Config(
                "data parallel needs at least one device".into(),
            ));
        }
        if devices[0] != self.device {
            return Err(TrainError::Config(
                "the first data-parallel device must be the trainer's device".into(),
            ));
        }
        if !self.config.optim.batch_size.is_multiple_of(n) {
            return Err(TrainError::Config(format!(
                "optim.batch_size = {} is not divisible by the {n} data-parallel devices",
                self.config.optim.batch_size
            )));
        }
        self.replicas = if n == 1 { Vec::new() } else { devices };
        Ok(self)
    }

    /// Joins a multi-node run (one process per node, see [`crate::distributed`]): each node
    /// computes the gradient of its `1/nodes` shard of every micro-batch (the same blocks and
    /// layer-dropout draws as single-process training, cut by rank), the nodes sum the gradients
    /// through burn-collective, and each applies the same update. The result equals
    /// single-process training up to float summation order. Refused unless every node starts
    /// the same run (config, data, weights, step: compared at start).
    ///
    /// `batch_size` must be divisible by the number of nodes; in-process data parallelism
    /// ([`Trainer::with_data_parallel`]) and multiple nodes do not combine.
    pub fn join_cluster(mut self, config: ClusterConfig) -> Result<Self> {
        config.validate()?;
        if !self.replicas.is_empty() {
            return Err(TrainError::Config(
                "several devices in one process and several nodes do not combine: give each \
                 node one device"
                    .into(),
            ));
        }
        if !self.config.optim.batch_size.is_multiple_of(config.nodes) {
            return Err(TrainError::Config(format!(
                "optim.batch_size = {} is not divisible by the {} nodes",
                self.config.optim.batch_size, config.nodes
            )));
        }
        if self.step == 0 {
            self.model = number_params(self.model);
        }
        let config_json = serde_json::to_vec(&self.config).expect("serialisable config");
        let mut print = Fingerprint::default()
            .mix(&config_json)
            .mix(&self.step.to_le_bytes());
        for blocks in [&self.train, &self.eval] {
            print = print.mix(&blocks.len().to_le_bytes());
            for block in &blocks.tokens {
                print = print.mix(&token_bytes(block));
            }
        }
        let print = print
            .mix_param_ids(&self.model)
            .mix_weights(&self.model.valid())
            .value();
        self.cluster = Some(Cluster::join(config, &self.device, print)?);
        Ok(self)
    }

    /// The multi-node run this trainer is part of, if any.
    pub fn cluster(&self) -> Option<&Cluster<B::InnerBackend>> {
        self.cluster.as_ref()
    }

    /// Whether this process writes the run's checkpoints and logs: rank 0 of a multi-node run,
    /// or the only process.
    pub fn is_primary(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.rank() == 0)
    }

    /// Waits for every node of a multi-node run (see [`Cluster::barrier`]); nothing without one.
    pub fn barrier(&self, what: &str) -> Result<()> {
        match &self.cluster {
            Some(cluster) => cluster.barrier(&self.device, what),
            None => Ok(()),
        }
    }

    /// Number of devices the batch is split across (1 without data parallelism).
    pub fn data_parallel_devices(&self) -> usize {
        self.replicas.len().max(1)
    }

    /// The model being trained.
    pub fn model(&self) -> &LlamaModel<B> {
        &self.model
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Evaluations so far.
    pub fn evals(&self) -> &[EvalReport] {
        &self.evals
    }

    /// Changes the total number of steps (e.g. to extend a resumed run). The learning-rate and
    /// dropout schedules are functions of `t / T`, so they change with it.
    pub fn set_total_steps(&mut self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(TrainError::Config("steps must be > 0".into()));
        }
        self.config.steps = steps;
        Ok(())
    }

    /// Whether every step has been taken.
    pub fn finished(&self) -> bool {
        self.step >= self.config.steps
    }

    /// One optimizer step over `grad_accum` micro-batches.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let (c, step) = (&self.config, self.step);
        let layers = self.model.num_layers();
        let lr = c.learning_rate(step);
        let rates = match &c.layer_dropout {
            Some(d) => d.rates(step, c.steps, layers)?,
            None => vec![0.0; layers],
        };
        let weights: Vec<(usize, f64)> = match &c.early_exit {
            Some(e) => {
                let enabled =
                    e.curriculum
                        .enabled(step, c.steps, &parse_layers(&e.layers, layers)?);
                let w = loss_weights(e.scale, &enabled, layers, e.e_scale);
                enabled.into_iter().zip(w).collect()
            }
            None => vec![(layers - 1, 1.0)],
        };
        let exits: Vec<usize> = weights
            .iter()
            .map(|(l, _)| *l)
            .filter(|&l| l + 1 < layers)
            .collect();
        let accum = c.optim.grad_accum;
        let plan = StepPlan {
            weights: &weights,
            exits: &exits,
            precision: c.optim.mixed_precision,
            accum,
        };
        if !self.replicas.is_empty() {
            return self.data_parallel_step(lr, &rates, &plan);
        }
        if self.cluster.is_some() {
            return self.cluster_step(lr, &rates, &plan);
        }
        let mut accumulator = GradientsAccumulator::<LlamaModel<B>>::new();
        let (mut loss_sum, mut skipped, mut per_layer) = (0.0, 0usize, Vec::new());
        for micro in 0..accum {
            let (mask, indices) = self.micro_batch(micro, &rates);
            skipped += mask.skip.iter().flatten().filter(|&&s| s).count();
            // The whole micro-batch as one shard (its share of the loss tokens is 1).
            let shard = Shard {
                indices: &indices,
                mask,
                micro_tokens: self.train.loss_tokens(&indices).max(1.0),
            };
            let out = shard_output(&self.model, &self.train, shard, &plan)?;
            loss_sum += out.loss;
            per_layer = out.per_layer;
            accumulator.accumulate(&self.model, out.grads);
        }
        self.check_finite(loss_sum)?;
        self.model = self.optim.step(lr, self.model.clone(), accumulator.grads());
        Ok(self.finish_step(lr, loss_sum, per_layer, skipped))
    }

    /// The layer-dropout draws and the blocks of micro-batch `micro` of the current step: pure
    /// functions of (seed, step, micro), shared by single-device and data-parallel steps.
    fn micro_batch(&self, micro: usize, rates: &[f64]) -> (SkipMask, Vec<usize>) {
        let c = &self.config;
        let (accum, batch) = (c.optim.grad_accum, c.optim.batch_size);
        let global = self.step * accum + micro;
        let mut rng = ChaCha8Rng::seed_from_u64(c.seed ^ 0x5eed_0000_0000 ^ global as u64);
        let mask = draw_skip_mask(rates, batch, &mut rng);
        (mask, self.train.batch_indices(c.seed, global, batch))
    }

    /// Stops the run at a non-finite loss, before the optimizer step (whose update would make
    /// every weight NaN): the weights stay those of the previous step.
    fn check_finite(&self, loss: f64) -> Result<()> {
        if loss.is_finite() {
            return Ok(());
        }
        Err(TrainError::NonFinite {
            step: self.step + 1,
            loss,
        })
    }

    /// Counts the step taken and reports it.
    fn finish_step(
        &mut self,
        lr: f64,
        loss: f64,
        per_layer: Vec<(usize, f64, f64)>,
        skipped: usize,
    ) -> StepReport {
        let c = &self.config;
        let (accum, batch) = (c.optim.grad_accum, c.optim.batch_size);
        let report = StepReport {
            step: self.step,
            lr,
            loss,
            per_layer,
            skipped_fraction: skipped as f64 / (self.model.num_layers() * batch * accum) as f64,
            tokens: accum * batch * c.data.seq_len,
        };
        self.step += 1;
        report
    }

    /// Whether the run has held-out text to evaluate on (not with `data.eval_fraction = 0`).
    pub fn has_held_out(&self) -> bool {
        !self.eval.is_empty()
    }

    /// Held-out cross-entropy at every exit layer (no dropout, no gradients).
    pub fn evaluate(&mut self) -> Result<EvalReport> {
        if self.eval.is_empty() {
            return Err(TrainError::Data(
                "no held-out text to evaluate on (data.eval_fraction = 0)".into(),
            ));
        }
        let model = self.model.valid();
        let layers = model.num_layers();
        let all: Vec<usize> = (0..layers - 1).collect();
        let batch = self.config.optim.batch_size;
        let n_batches = self.eval.len().div_ceil(batch);
        let n_batches = if self.config.eval_batches == 0 {
            n_batches
        } else {
            n_batches.min(self.config.eval_batches)
        };
        let mut sums = vec![0.0; layers];
        let mut weight = 0.0;
        let device = self.device.clone();
        for b in 0..n_batches {
            let indices: Vec<usize> = (b * batch..((b + 1) * batch).min(self.eval.len())).collect();
            let (inputs, targets, mask) = self.eval.tensors::<B::InnerBackend>(&indices, &device);
            let w = mask.clone().sum().into_scalar().elem::<f64>();
            let out = model.forward_train(inputs, &all, None)?;
            for (l, h) in out.exit_hidden {
                sums[l] +=
                    w * masked_cross_entropy(model.exit_head(h), targets.clone(), mask.clone())
                        .into_scalar()
                        .elem::<f64>();
            }
            sums[layers - 1] += w * masked_cross_entropy(out.logits, targets, mask)
                .into_scalar()
                .elem::<f64>();
            weight += w;
        }
        let report = EvalReport {
            step: self.step,
            loss: sums.iter().map(|s| s / weight.max(1.0)).collect(),
        };
        self.evals.push(report.clone());
        Ok(report)
    }
}

/// The bytes of token ids, little-endian.
fn token_bytes(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}
