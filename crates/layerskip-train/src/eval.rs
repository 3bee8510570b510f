//! Per-exit quality of a checkpoint on held-out text: what `layerskip eval` prints and plots.
//!
//! For every exit `E` (layers `0..E`, then the shared exit head) it measures the cross-entropy
//! and perplexity against the next token, top-1 accuracy, and top-1 agreement with the full
//! model (`E = L`). Agreement is what bounds a greedy self-speculative draft's acceptance rate,
//! so this table says at a glance whether a model was trained for early exit.

use burn::tensor::activation::log_softmax;
use burn::tensor::{ElementConversion, Int, Tensor};
use layerskip_model::LayerSkipBackend;
use layerskip_model::LlamaModel;
use serde::{Deserialize, Serialize};

use crate::data::Blocks;
use crate::error::{Result, TrainError};

/// Quality of one exit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitQuality {
    /// Layers run before the exit head (`1..=L`; `L` is the full model).
    pub exit_layer: usize,
    /// Mean cross-entropy (nats per token) over the scored positions.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Fraction of positions whose top-1 token is the next token.
    pub accuracy: f64,
    /// Fraction of positions whose top-1 token equals the full model's top-1 token.
    pub agreement: f64,
}

/// Per-exit quality over a set of blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitReport {
    /// Blocks evaluated.
    pub blocks: usize,
    /// Positions scored (loss-mask weight).
    pub tokens: usize,
    /// One entry per exit, `exit_layer` ascending, the full model last.
    pub exits: Vec<ExitQuality>,
}

/// Running sums of one exit.
#[derive(Default, Clone)]
struct Sums {
    nll: f64,
    correct: f64,
    agree: f64,
}

/// Evaluates every exit of `model` on the first `max_blocks` blocks (all when `None`),
/// `batch_size` blocks per forward pass. No layer dropout, no gradients.
pub fn exit_quality<B: LayerSkipBackend>(
    model: &LlamaModel<B>,
    blocks: &Blocks,
    batch_size: usize,
    max_blocks: Option<usize>,
) -> Result<ExitReport> {
    exit_quality_with_progress(model, blocks, batch_size, max_blocks, |_, _| {})
}

/// [`exit_quality`], calling `on_batch(done, total)` after each batch of blocks.
pub fn exit_quality_with_progress<B: LayerSkipBackend>(
    model: &LlamaModel<B>,
    blocks: &Blocks,
    batch_size: usize,
    max_blocks: Option<usize>,
    mut on_batch: impl FnMut(usize, usize),
) -> Result<ExitReport> {
    let n = max_blocks.map_or(blocks.len(), |m| m.min(blocks.len()));
    if n == 0 {
        return Err(TrainError::Data(
            "no held-out block to evaluate (is the text shorter than one block?)".into(),
        ));
    }
    if batch_size == 0 {
        return Err(TrainError::Config("batch size must be >= 1".into()));
    }
    let layers = model.num_layers();
    let early: Vec<usize> = (0..layers - 1).collect();
    let device = model.device();
    let mut sums = vec![Sums::default(); layers];
    let mut weight = 0.0;
    for start in (0..n).step_by(batch_size) {
        let indices: Vec<usize> = (start..(start + batch_size).min(n)).collect();
        let (inputs, targets, mask) = blocks.tensors::<B>(&indices, &device);
        weight += mask.clone().sum().into_scalar().elem::<f64>();
        let out = model.forward_train(inputs, &early, None)?;
        let final_top = out.logits.clone().argmax(2).squeeze_dim::<2>(2);
        let mut add = |l: usize, logits: Tensor<B, 3>| {
            let s = score(logits, &targets, &final_top, &mask);
            sums[l].nll += s[0];
            sums[l].correct += s[1];
            sums[l].agree += s[2];
        };
        for (l, h) in out.exit_hidden {
            add(l, model.exit_head(h));
        }
        add(layers - 1, out.logits);
        on_batch(start / batch_size + 1, n.div_ceil(batch_size));
    }
    let w = weight.max(1.0);
    Ok(ExitReport {
        blocks: n,
        tokens: weight as usize,
        exits: sums
            .iter()
            .enumerate()
            .map(|(l, s)| ExitQuality {
                exit_layer: l + 1,
                loss: s.nll / w,
                perplexity: (s.nll / w).exp(),
                accuracy: s.correct / w,
                agreement: s.agree / w,
            })
            .collect(),
    })
}

/// `[summed NLL, correct top-1, top-1 equal to the final layer's]` over masked positions.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`; `targets`, `final_top`: `[batch, seq]`; `mask`: `[batch, seq]`
fn score<B: LayerSkipBackend>(
    logits: Tensor<B, 3>,
    targets: &Tensor<B, 2, Int>,
    final_top: &Tensor<B, 2, Int>,
    mask: &Tensor<B, 2>,
) -> [f64; 3] {
    let top = logits.clone().argmax(2).squeeze_dim::<2>(2);
    let logp = log_softmax(logits, 2);
    let picked = logp
        .gather(2, targets.clone().unsqueeze_dim(2))
        .squeeze_dim::<2>(2);
    let sum = |t: Tensor<B, 2>| (t * mask.clone()).sum().into_scalar().elem::<f64>();
    [
        -sum(picked),
        sum(top.clone().equal(targets.clone()).float()),
        sum(top.equal(final_top.clone()).float()),
    ]
}
