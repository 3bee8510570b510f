//! The training loop: layer dropout + early-exit loss, AdamW with warm-up and cosine decay,
//! gradient clipping and accumulation, per-exit evaluation, and checkpoints that resume exactly.
//!
//! Every random choice (data order, dropout draws) is a pure function of (seed, step), and a
//! checkpoint holds the model with its parameter ids and the optimizer state, so N steps straight
//! and N/2 + resume + N/2 give the same weights bit for bit.

use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::grad_clipping::GradientClippingConfig;
use burn::module::{AutodiffModule, Module};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{
    AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, MultiGradientsParams, Optimizer,
};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::DeviceOps;
use burn::tensor::{DType, ElementConversion, FloatDType};
use layerskip_model::checkpoint::write_atomic;
use layerskip_model::{LlamaModel, SaveDtype, SkipMask};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{MixedPrecision, TrainConfig};
use crate::data::Blocks;
use crate::distributed::{Cluster, ClusterConfig, Fingerprint, gradient_presence, number_params};
use crate::error::{Result, TrainError};
use crate::loss::{early_exit_loss, masked_cross_entropy};
use crate::run_dir::{DurableMpkRecorder, sync_dir};
use crate::schedule::{loss_weights, parse_layers};

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

/// What a checkpoint directory's `trainer_state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    config: TrainConfig,
    evals: Vec<EvalReport>,
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

/// What one data-parallel worker returns for its shard of a micro-batch.
struct ShardOutput {
    grads: GradientsParams,
    /// `(layer, weight, CE * shard tokens / micro-batch tokens)`.
    per_layer: Vec<(usize, f64, f64)>,
    loss: f64,
}

/// What every shard of a step shares: the exits and their loss weights, the compute precision,
/// and the number of micro-batches the loss is averaged over.
struct StepPlan<'a> {
    weights: &'a [(usize, f64)],
    exits: &'a [usize],
    precision: MixedPrecision,
    accum: usize,
}

/// One shard of a micro-batch: its blocks, their layer-dropout draws, and the loss tokens of the
/// whole micro-batch (each shard's loss is scaled by its share of them).
struct Shard<'a> {
    indices: &'a [usize],
    mask: SkipMask,
    micro_tokens: f64,
}

/// The draws of the sequences `rows` of a micro-batch.
fn shard_mask(mask: &SkipMask, rows: Range<usize>) -> SkipMask {
    SkipMask {
        skip: mask.skip.iter().map(|r| r[rows.clone()].to_vec()).collect(),
    }
}

/// Forward and backward of one shard on `model` (on the shard's device): the gradient of the
/// shard's share of the micro-batch loss, so the shards' gradients sum to the micro-batch's.
fn shard_output<B: crate::TrainBackend>(
    model: &LlamaModel<B>,
    train: &Blocks,
    shard: Shard,
    plan: &StepPlan,
) -> Result<ShardOutput> {
    let device = model
        .devices()
        .into_iter()
        .next()
        .expect("a model has parameters");
    let compute = compute_copy(model, plan.precision);
    let share = train.loss_tokens(shard.indices) / shard.micro_tokens;
    let (inputs, targets, loss_mask) = train.tensors::<B>(shard.indices, &device);
    let any_skip = shard.mask.skip.iter().flatten().any(|&s| s);
    let output =
        compute.forward_train_hidden(inputs, plan.exits, any_skip.then_some(&shard.mask))?;
    let loss = early_exit_loss(&compute, output, targets, loss_mask, plan.weights);
    let per_layer = loss
        .per_layer
        .iter()
        .map(|(l, w, ce)| (*l, *w, share * ce.clone().into_scalar().elem::<f64>()))
        .collect();
    let total = loss.total * (share / plan.accum as f64);
    let value = total.clone().into_scalar().elem::<f64>();
    let grads = GradientsParams::from_grads(total.backward(), model);
    Ok(ShardOutput {
        grads,
        per_layer,
        loss: value,
    })
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

    /// Continues the run saved in checkpoint directory `dir` (model, optimizer, step).
    pub fn resume(dir: &Path, train: Blocks, eval: Blocks, device: B::Device) -> Result<Self> {
        let state = read_state(dir)?;
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        let file_err = |path: PathBuf| {
            move |e: burn::record::RecorderError| TrainError::File {
                path,
                message: e.to_string(),
            }
        };
        // The HF files give the architecture; the Burn record restores weights and parameter ids,
        // which the optimizer state is keyed by.
        let skeleton = LlamaModel::<B>::from_pretrained(dir, &device)?;
        let model = skeleton
            .load_file(dir.join("model"), &recorder, &device)
            .map_err(file_err(dir.join("model.mpk")))?;
        let record = recorder
            .load(dir.join("optimizer"), &device)
            .map_err(file_err(dir.join("optimizer.mpk")))?;
        let optim = optimizer::<B>(&state.config).load_record(record);
        let mut trainer = Self::new(state.config, model, train, eval, device)?;
        trainer.optim = optim;
        trainer.step = state.step;
        trainer.evals = state.evals;
        Ok(trainer)
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

    /// Counts the step taken and reports it.
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

    /// [`Trainer::train_step`] split across the data-parallel devices.
    fn data_parallel_step(
        &mut self,
        lr: f64,
        rates: &[f64],
        plan: &StepPlan,
    ) -> Result<StepReport> {
        let c = &self.config;
        let (accum, batch) = (c.optim.grad_accum, c.optim.batch_size);
        let shard = batch / self.replicas.len();
        let mut accumulators: Vec<GradientsAccumulator<LlamaModel<B>>> = self
            .replicas
            .iter()
            .map(|_| GradientsAccumulator::new())
            .collect();
        let (mut loss_sum, mut skipped, mut per_layer) = (0.0, 0usize, Vec::new());
        for micro in 0..accum {
            // The same draws and blocks as single-device training, cut into shards.
            let (mask, indices) = self.micro_batch(micro, rates);
            skipped += mask.skip.iter().flatten().filter(|&&s| s).count();
            let micro_tokens = self.train.loss_tokens(&indices).max(1.0);
            let (model, train) = (&self.model, &self.train);
            let outputs: Vec<Result<ShardOutput>> = std::thread::scope(|scope| {
                let workers: Vec<_> = self
                    .replicas
                    .iter()
                    .enumerate()
                    .map(|(i, device)| {
                        let rows = i * shard..(i + 1) * shard;
                        let shard = Shard {
                            indices: &indices[rows.clone()],
                            mask: shard_mask(&mask, rows),
                            micro_tokens,
                        };
                        scope.spawn(move || {
                            let replica = model.clone().fork(device);
                            shard_output(&replica, train, shard, plan)
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("data-parallel worker panicked"))
                    .collect()
            });
            per_layer = Vec::new();
            for (acc, out) in accumulators.iter_mut().zip(outputs) {
                let out = out?;
                loss_sum += out.loss;
                if per_layer.is_empty() {
                    per_layer = out.per_layer;
                } else {
                    for (p, (_, _, ce)) in per_layer.iter_mut().zip(out.per_layer) {
                        p.2 += ce;
                    }
                }
                acc.accumulate(&self.model, out.grads);
            }
        }
        let grads = MultiGradientsParams {
            grads: accumulators
                .into_iter()
                .zip(&self.replicas)
                .map(|(mut acc, device)| (acc.grads(), device.id()))
                .collect(),
        };
        self.check_finite(loss_sum)?;
        let updated = self.optim.step_multi(lr, self.model.clone(), grads);
        // Parameters were updated on the devices that accumulated them; gather them on the
        // trainer's device for evaluation, checkpoints and the next step's replicas.
        self.model = updated.fork(&self.device);
        Ok(self.finish_step(lr, loss_sum, per_layer, skipped))
    }

    /// [`Trainer::train_step`] of one node of a multi-node run: this node's shard of every
    /// micro-batch, then the gradients and the reported losses summed over the nodes.
    fn cluster_step(&mut self, lr: f64, rates: &[f64], plan: &StepPlan) -> Result<StepReport> {
        let cluster = self.cluster.as_ref().expect("a cluster step has a cluster");
        let c = &self.config;
        let (accum, batch) = (c.optim.grad_accum, c.optim.batch_size);
        let shard = batch / cluster.nodes();
        let rows = cluster.rank() * shard..(cluster.rank() + 1) * shard;
        let mut accumulator = GradientsAccumulator::<LlamaModel<B>>::new();
        let (mut loss, mut skipped, mut per_layer) = (0.0, 0usize, Vec::new());
        for micro in 0..accum {
            let (mask, indices) = self.micro_batch(micro, rates);
            skipped += mask.skip.iter().flatten().filter(|&&s| s).count();
            let shard = Shard {
                indices: &indices[rows.clone()],
                mask: shard_mask(&mask, rows.clone()),
                micro_tokens: self.train.loss_tokens(&indices).max(1.0),
            };
            let out = shard_output(&self.model, &self.train, shard, plan)?;
            loss += out.loss;
            per_layer = out.per_layer;
            accumulator.accumulate(&self.model, out.grads);
        }
        // One small all-reduce first: the losses, and which parameters have a gradient on any
        // node (layer dropout can leave a layer out of one node's shard).
        let grads = accumulator.grads();
        let presence = gradient_presence(&self.model, &grads);
        let mut values = vec![loss];
        values.extend(per_layer.iter().map(|(_, _, ce)| *ce));
        values.extend(presence.iter().map(|&p| f64::from(u8::from(p))));
        let what = format!("summing the losses of step {}", self.step);
        let summed = cluster.all_reduce_values(&values, &self.device, &what)?;
        for (p, ce) in per_layer.iter_mut().zip(&summed[1..]) {
            p.2 = *ce;
        }
        let needed: Vec<bool> = summed[1 + per_layer.len()..]
            .iter()
            .map(|&n| n > 0.0)
            .collect();
        let grads = cluster.all_reduce_grads(&self.model, grads, &needed, self.step)?;
        // After the all-reduce, so that every node stops at the same step.
        self.check_finite(summed[0])?;
        self.model = self.optim.step(lr, self.model.clone(), grads);
        Ok(self.finish_step(lr, summed[0], per_layer, skipped))
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

    /// Writes `out_dir/checkpoint-NNNNNN` (HF model files, Burn model and optimizer records,
    /// trainer state, and `extra_files` such as the tokenizer) through a temporary directory and
    /// a rename, and points `out_dir/latest` at it. Every file is synced before the rename and the
    /// directory after it, so a crash leaves the previous checkpoint or this one, whole. Returns
    /// the checkpoint directory.
    ///
    /// A checkpoint of this step that is already there (a resumed run that ends where it
    /// started) is this run's state at this step, so it is kept as it is, never rewritten: there
    /// is no moment without a complete copy. A directory of that name that is not a checkpoint of
    /// this step is refused.
    pub fn save_checkpoint(
        &self,
        out_dir: &Path,
        extra_files: &[(&str, &[u8])],
    ) -> Result<PathBuf> {
        let name = format!("checkpoint-{:06}", self.step);
        let final_dir = out_dir.join(&name);
        let tmp = out_dir.join(format!(".{name}.tmp"));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e: std::io::Error| TrainError::File {
                path: p,
                message: e.to_string(),
            }
        };
        if final_dir.exists() {
            match read_state(&final_dir) {
                Ok(state) if state.step == self.step => {
                    write_atomic(&out_dir.join("latest"), name.as_bytes())?;
                    sync_dir(out_dir)?;
                    return Ok(final_dir);
                }
                _ => {
                    return Err(TrainError::File {
                        path: final_dir,
                        message: format!(
                            "exists but is not this run's checkpoint of step {}; move it away",
                            self.step
                        ),
                    });
                }
            }
        }
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        self.model.save_pretrained(&tmp, SaveDtype::F32)?;
        let recorder = DurableMpkRecorder;
        let rec_err = |e: burn::record::RecorderError| TrainError::File {
            path: tmp.clone(),
            message: match e {
                burn::record::RecorderError::Unknown(m) => m,
                other => other.to_string(),
            },
        };
        recorder
            .record(self.model.clone().into_record(), tmp.join("model.mpk"))
            .map_err(rec_err)?;
        recorder
            .record(self.optim.to_record(), tmp.join("optimizer.mpk"))
            .map_err(rec_err)?;
        let state = TrainerState {
            step: self.step,
            config: self.config.clone(),
            evals: self.evals.clone(),
        };
        let json = serde_json::to_string_pretty(&state).expect("serialisable state");
        write_atomic(&tmp.join("trainer_state.json"), json.as_bytes())?;
        for (name, bytes) in extra_files {
            write_atomic(&tmp.join(name), bytes)?;
        }
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        write_atomic(&out_dir.join("latest"), name.as_bytes())?;
        sync_dir(out_dir)?;
        Ok(final_dir)
    }
}

/// The bytes of token ids, little-endian.
fn token_bytes(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::File {
        path: path.clone(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| TrainError::File {
        path,
        message: e.to_string(),
    })
}

/// The configuration the run saved in checkpoint directory `dir` was trained with.
pub fn saved_config(dir: &Path) -> Result<TrainConfig> {
    Ok(read_state(dir)?.config)
}

/// The checkpoint that `out_dir/latest` points at, if any.
pub fn latest_checkpoint(out_dir: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(out_dir.join("latest")).ok()?;
    let dir = out_dir.join(name.trim());
    dir.join("trainer_state.json").is_file().then_some(dir)
}
