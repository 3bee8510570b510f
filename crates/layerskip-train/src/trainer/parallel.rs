//! A step's forward and backward over shards of its micro-batches: one shard on a single
//! device, one per device in data-parallel training, one per node in a multi-node run.

use std::ops::Range;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams, MultiGradientsParams, Optimizer};
use burn::tensor::ElementConversion;
use burn::tensor::backend::DeviceOps;
use layerskip_model::{LlamaModel, SkipMask};

use super::{StepReport, Trainer, compute_copy};
use crate::config::MixedPrecision;
use crate::data::Blocks;
use crate::distributed::gradient_presence;
use crate::error::Result;
use crate::loss::early_exit_loss;

/// What one data-parallel worker returns for its shard of a micro-batch.
pub(super) struct ShardOutput {
    pub(super) grads: GradientsParams,
    /// `(layer, weight, CE * shard tokens / micro-batch tokens)`.
    pub(super) per_layer: Vec<(usize, f64, f64)>,
    pub(super) loss: f64,
}

/// What every shard of a step shares: the exits and their loss weights, the compute precision,
/// and the number of micro-batches the loss is averaged over.
pub(super) struct StepPlan<'a> {
    pub(super) weights: &'a [(usize, f64)],
    pub(super) exits: &'a [usize],
    pub(super) precision: MixedPrecision,
    pub(super) accum: usize,
}

/// One shard of a micro-batch: its blocks, their layer-dropout draws, and the loss tokens of the
/// whole micro-batch (each shard's loss is scaled by its share of them).
pub(super) struct Shard<'a> {
    pub(super) indices: &'a [usize],
    pub(super) mask: SkipMask,
    pub(super) micro_tokens: f64,
}

/// The draws of the sequences `rows` of a micro-batch.
fn shard_mask(mask: &SkipMask, rows: Range<usize>) -> SkipMask {
    SkipMask {
        skip: mask.skip.iter().map(|r| r[rows.clone()].to_vec()).collect(),
    }
}

/// Forward and backward of one shard on `model` (on the shard's device): the gradient of the
/// shard's share of the micro-batch loss, so the shards' gradients sum to the micro-batch's.
pub(super) fn shard_output<B: crate::TrainBackend>(
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

impl<B: crate::TrainBackend> Trainer<B> {
    /// [`Trainer::train_step`] split across the data-parallel devices.
    pub(super) fn data_parallel_step(
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
    pub(super) fn cluster_step(
        &mut self,
        lr: f64,
        rates: &[f64],
        plan: &StepPlan,
    ) -> Result<StepReport> {
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
}
