//! [`LayerSkipBackend`] for `Autodiff<B>` (training): Burn's ops, so gradients flow, except
//! where the inner backend `B` has a fused training kernel; such an op computes its gradients
//! with the kernel and registers them as one backward step of the autodiff graph (Burn's
//! backend-extension pattern for autodiff, as in its `custom-cubecl-kernel` example).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::module::Param;
use burn::nn::RmsNorm;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorPrimitive};

use super::{Head, HeadLoss, LayerSkipBackend, Packed, SelfAttention, burn_ops};
use crate::rope::RopeTables;

impl<B: LayerSkipBackend, C: CheckpointStrategy> LayerSkipBackend for Autodiff<B, C> {
    fn product(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        packed: &Packed,
        cols: usize,
    ) -> Tensor<Self, 3> {
        let [b, s, k] = x.dims();
        if packed.bf16_products && cols == weight.dims()[1] {
            let rows = x.clone().reshape([b * s, k]);
            if let Some(y) = Self::linear_forward(rows, weight.clone(), true) {
                return y.reshape([b, s, cols]);
            }
        }
        burn_ops::product(x, weight, cols)
    }

    fn bf16_products() -> bool {
        B::bf16_products()
    }

    fn prepared_rows_limit() -> Option<usize> {
        B::prepared_rows_limit()
    }

    fn linear_forward(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        bf16: bool,
    ) -> Option<Tensor<Self, 2>> {
        fused_linear::<B, C>(x, w, bf16)
    }

    fn rms_norm(norm: &RmsNorm<Self>, x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        if !B::FUSED_BACKWARD {
            return norm.forward(x);
        }
        let x = x.into_primitive().tensor();
        let gain = norm.gamma.val().into_primitive().tensor();
        let inner_norm = RmsNorm {
            gamma: Param::from_tensor(inner(&gain.primitive)),
            epsilon: norm.epsilon,
        };
        let out = B::rms_norm(&inner_norm, inner(&x.primitive));
        let out = out.into_primitive().tensor();
        let result = match RmsNormBackward
            .prepare::<C>([x.node.clone(), gain.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x.primitive, gain.primitive, norm.epsilon), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(result))
    }

    fn silu_mul(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        if !B::FUSED_BACKWARD {
            return burn_ops::silu_mul(gate, up);
        }
        let [gate, up] = [gate, up].map(|t| t.into_primitive().tensor());
        let out = B::silu_mul(inner(&gate.primitive), inner(&up.primitive));
        let out = out.into_primitive().tensor();
        let result = match SiluMulBackward
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish([gate.primitive, up.primitive], out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(result))
    }

    fn rope(x: Tensor<Self, 4>, tables: &RopeTables<Self>) -> Tensor<Self, 4> {
        if !B::FUSED_BACKWARD {
            return burn_ops::rope(x, tables);
        }
        let x = x.into_primitive().tensor();
        let tables = RopeTables {
            cos: tables.cos.clone().inner(),
            sin: tables.sin.clone().inner(),
        };
        let out = B::rope(inner(&x.primitive), &tables)
            .into_primitive()
            .tensor();
        let result = match RopeBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = [tables.cos, tables.sin].map(|t| t.into_primitive().tensor());
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(result))
    }

    fn self_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 3> {
        fused_self_attention::<B, C>([q.clone(), k.clone(), v.clone()])
            .unwrap_or_else(|| burn_ops::self_attention(q, k, v))
    }

    fn exit_cross_entropy(
        x: Tensor<Self, 2>,
        head: Head<Self>,
        packed: &Packed,
        targets: Tensor<Self, 1, Int>,
        weights: Tensor<Self, 1>,
    ) -> Tensor<Self, 1> {
        let bf16 = packed.bf16_products;
        fused_exit_cross_entropy::<B, C>(x.clone(), &head, bf16, targets.clone(), weights.clone())
            .unwrap_or_else(|| burn_ops::exit_cross_entropy(x, head, targets, weights))
    }
}

/// The backward step of the fused head + cross-entropy: the gradients were computed with the
/// loss, so it only scales them by the loss's incoming gradient.
#[derive(Debug)]
struct HeadCrossEntropyBackward;

impl<B: Backend> Backward<B, 2> for HeadCrossEntropyBackward {
    /// d loss / d x and d loss / d head weight.
    type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad =
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let (dx, dw) = ops.state;
        let scaled = |d: B::FloatTensorPrimitive| {
            let d = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(d));
            let g = grad.clone().cast(d.dtype()).reshape([1, 1]);
            (d * g).into_primitive().tensor()
        };
        if let Some(node) = node_x {
            grads.register::<B>(node.id, scaled(dx));
        }
        if let Some(node) = node_w {
            grads.register::<B>(node.id, scaled(dw));
        }
    }
}

/// [`LayerSkipBackend::exit_cross_entropy`] through `B`'s fused kernel, or `None` where `B`
/// has none.
fn fused_exit_cross_entropy<B: LayerSkipBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    head: &Head<Autodiff<B, C>>,
    bf16: bool,
    targets: Tensor<Autodiff<B, C>, 1, Int>,
    weights: Tensor<Autodiff<B, C>, 1>,
) -> Option<Tensor<Autodiff<B, C>, 1>> {
    let (tied, w) = match head {
        Head::Tied(e) => (true, e.clone()),
        Head::Untied(w) => (false, w.clone()),
    };
    let x = x.into_primitive().tensor();
    let w = w.into_primitive().tensor();
    let inner = |p: &B::FloatTensorPrimitive| {
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p.clone()))
    };
    let inner_head = if tied {
        Head::Tied(inner(&w.primitive))
    } else {
        Head::Untied(inner(&w.primitive))
    };
    let targets = Tensor::<B, 1, Int>::from_primitive(targets.into_primitive());
    let weights = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(
        weights.into_primitive().tensor().primitive,
    ));
    let tracked = !(x.node.requirement.is_none() && w.node.requirement.is_none());
    let HeadLoss { loss, grads } = B::head_cross_entropy(
        inner(&x.primitive),
        &inner_head,
        bf16,
        targets,
        weights,
        tracked,
    )?;
    let loss = loss.into_primitive().tensor();
    let out = match HeadCrossEntropyBackward
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (dx, dw) = grads.expect("gradients were asked for");
            let state = (dx.into_primitive().tensor(), dw.into_primitive().tensor());
            prep.finish(state, loss)
        }
        OpsKind::UnTracked(prep) => prep.finish(loss),
    };
    Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// The backward step of the fused self-attention: the inner backend's
/// [`LayerSkipBackend::self_attention_backward`].
#[derive(Debug)]
struct SelfAttentionBackward;

impl<B: LayerSkipBackend> Backward<B, 3> for SelfAttentionBackward {
    /// q, k, v, and the forward's output and log-sum-exp.
    type State = [B::FloatTensorPrimitive; 5];

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout =
            Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let [q, k, v, out, lse] = ops.state;
        let four = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
        let three = |p| Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(p));
        let forward = SelfAttention {
            out: three(out),
            lse: three(lse),
        };
        let d = B::self_attention_backward([four(q), four(k), four(v)], forward, dout);
        for (node, grad) in ops.parents.into_iter().zip(d) {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

/// [`LayerSkipBackend::self_attention`] through `B`'s fused kernel, or `None` where `B` has
/// none.
fn fused_self_attention<B: LayerSkipBackend, C: CheckpointStrategy>(
    qkv: [Tensor<Autodiff<B, C>, 4>; 3],
) -> Option<Tensor<Autodiff<B, C>, 3>> {
    let [q, k, v] = qkv.map(|t| t.into_primitive().tensor());
    let inner = |p: &B::FloatTensorPrimitive| {
        Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p.clone()))
    };
    let SelfAttention { out, lse } = B::self_attention_forward(
        inner(&q.primitive),
        inner(&k.primitive),
        inner(&v.primitive),
    )?;
    let (out, lse) = (out.into_primitive().tensor(), lse.into_primitive().tensor());
    let result = match SelfAttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = [q.primitive, k.primitive, v.primitive, out.clone(), lse];
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(Tensor::from_primitive(TensorPrimitive::Float(result)))
}

/// The backward step of [`LayerSkipBackend::linear_forward`]: the inner backend's
/// [`LayerSkipBackend::linear_backward`].
#[derive(Debug)]
struct LinearBackward;

impl<B: LayerSkipBackend> Backward<B, 2> for LinearBackward {
    /// x, W and whether the operands are bf16.
    type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive, bool);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = inner::<B, 2>(&grads.consume::<B>(&ops.node));
        let (x, w, bf16) = ops.state;
        let d = B::linear_backward(inner(&x), inner(&w), dy, bf16);
        for (node, grad) in ops.parents.into_iter().zip(d) {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

/// `x · W` through `B`'s linear kernel, or `None` where `B` has none for these inputs.
fn fused_linear<B: LayerSkipBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    w: Tensor<Autodiff<B, C>, 2>,
    bf16: bool,
) -> Option<Tensor<Autodiff<B, C>, 2>> {
    let [x, w] = [x, w].map(|t| t.into_primitive().tensor());
    let y = B::linear_forward(inner(&x.primitive), inner(&w.primitive), bf16)?;
    let y = y.into_primitive().tensor();
    let result = match LinearBackward
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((x.primitive, w.primitive, bf16), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Tensor::from_primitive(TensorPrimitive::Float(result)))
}

/// An inner-backend tensor of any rank from its primitive.
fn inner<B: Backend, const D: usize>(p: &B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p.clone()))
}

/// The backward step of [`LayerSkipBackend::silu_mul`]: the inner backend's
/// [`LayerSkipBackend::silu_mul_backward`].
#[derive(Debug)]
struct SiluMulBackward;

impl<B: LayerSkipBackend> Backward<B, 2> for SiluMulBackward {
    /// gate and up.
    type State = [B::FloatTensorPrimitive; 2];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = inner::<B, 3>(&grads.consume::<B>(&ops.node));
        let [gate, up] = ops.state;
        let d = B::silu_mul_backward(inner(&gate), inner(&up), dy);
        for (node, grad) in ops.parents.into_iter().zip(d) {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

/// The backward step of [`LayerSkipBackend::rope`]: the inner backend's
/// [`LayerSkipBackend::rope_backward`].
#[derive(Debug)]
struct RopeBackward;

impl<B: LayerSkipBackend> Backward<B, 1> for RopeBackward {
    /// The tables' cos and sin.
    type State = [B::FloatTensorPrimitive; 2];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = inner::<B, 4>(&grads.consume::<B>(&ops.node));
        let [cos, sin] = ops.state;
        let tables = RopeTables {
            cos: inner(&cos),
            sin: inner(&sin),
        };
        let [node] = ops.parents;
        if let Some(node) = node {
            let dx = B::rope_backward(dy, &tables);
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
    }
}

/// The backward step of [`LayerSkipBackend::rms_norm`]: the inner backend's
/// [`LayerSkipBackend::rms_norm_backward`].
#[derive(Debug)]
struct RmsNormBackward;

impl<B: LayerSkipBackend> Backward<B, 2> for RmsNormBackward {
    /// x, the gain and epsilon.
    type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = inner::<B, 3>(&grads.consume::<B>(&ops.node));
        let (x, gain, epsilon) = ops.state;
        let norm = RmsNorm {
            gamma: Param::from_tensor(inner(&gain)),
            epsilon,
        };
        let (dx, d_gain) = B::rms_norm_backward(&norm, inner(&x), dy);
        let [node_x, node_gain] = ops.parents;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
        if let Some(node) = node_gain {
            grads.register::<B>(node.id, d_gain.into_primitive().tensor());
        }
    }
}
