//! The early-exit loss through the shared exit head:
//! `J = sum_l ẽ(t, l) * CE(head(x_{l+1}), Y)` over the enabled layers.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, backend::Backend};
use layerskip_model::LayerSkipBackend;
use layerskip_model::{LlamaModel, TrainHidden};

/// The loss of one batch.
#[derive(Debug, Clone)]
pub struct EarlyExitLoss<B: Backend> {
    /// `J`, the weighted sum (a scalar `[1]`), to differentiate.
    pub total: Tensor<B, 1>,
    /// `(layer, weight, CE)` of each enabled layer, CE as a scalar tensor.
    pub per_layer: Vec<(usize, f64, Tensor<B, 1>)>,
}

/// Mean cross-entropy over the positions where `mask` is 1.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`; `targets`: `[batch, seq]` (any valid id where masked out);
///   `mask`: `[batch, seq]` of 0/1
pub fn masked_cross_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 1> {
    // Half-precision logits (mixed precision) are widened: log-softmax over a vocabulary in bf16
    // loses the small probabilities the loss is made of.
    let logits = if logits.dtype() == mask.dtype() {
        logits
    } else {
        logits.cast(mask.dtype())
    };
    let logp = log_softmax(logits, 2);
    let picked = logp.gather(2, targets.unsqueeze_dim(2)).squeeze_dim::<2>(2);
    let count = mask.clone().sum().clamp_min(1.0);
    (picked * mask).sum().neg() / count
}

/// Combines the exits of a training forward ([`LlamaModel::forward_train_hidden`]: the enabled
/// exits' hidden states and the last layer's output) into the early-exit loss. `weights` pairs
/// each enabled layer (ascending, the last layer `L - 1` included) with its normalised weight;
/// every exit goes through the shared exit head ([`LlamaModel::exit_cross_entropy`], fused with
/// the cross-entropy where the backend has the kernel).
pub fn early_exit_loss<B: LayerSkipBackend>(
    model: &LlamaModel<B>,
    TrainHidden { exit_hidden, last }: TrainHidden<B>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    weights: &[(usize, f64)],
) -> EarlyExitLoss<B> {
    let last_layer = model.num_layers() - 1;
    // The masked mean as per-position weights: mask / count.
    let count = mask.clone().sum().clamp_min(1.0).unsqueeze::<2>();
    let row_weights = mask / count;
    let mut hidden = exit_hidden.into_iter();
    let mut last = Some(last);
    let mut per_layer = Vec::with_capacity(weights.len());
    for &(layer, weight) in weights {
        let h = if layer == last_layer {
            last.take().expect("last layer weighed once")
        } else {
            let (l, h) = hidden
                .find(|(l, _)| *l == layer)
                .expect("hidden state of an enabled layer");
            debug_assert_eq!(l, layer);
            h
        };
        let ce = model.exit_cross_entropy(h, targets.clone(), row_weights.clone());
        per_layer.push((layer, weight, ce));
    }
    let total = per_layer
        .iter()
        .map(|(_, w, ce)| ce.clone() * *w)
        .reduce(|a, b| a + b)
        .expect("at least the last layer");
    EarlyExitLoss { total, per_layer }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn cross_entropy_by_hand() {
        let device = Default::default();
        // Two positions over a vocabulary of 2: logits [0, ln 3] -> p = [1/4, 3/4].
        let logits = Tensor::<Flex, 3>::from_data(
            TensorData::new(vec![0.0, 3f32.ln(), 0.0, 3f32.ln()], [1, 2, 2]),
            &device,
        );
        let targets =
            Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![0i64, 1], [1, 2]), &device);
        let both =
            Tensor::<Flex, 2>::from_data(TensorData::new(vec![1.0f32, 1.0], [1, 2]), &device);
        let first =
            Tensor::<Flex, 2>::from_data(TensorData::new(vec![1.0f32, 0.0], [1, 2]), &device);
        let ce = |m| masked_cross_entropy(logits.clone(), targets.clone(), m).into_scalar();
        assert!((ce(both) - (4f32.ln() + (4.0f32 / 3.0).ln()) / 2.0).abs() < 1e-6);
        assert!((ce(first) - 4f32.ln()).abs() < 1e-6);
    }
}
