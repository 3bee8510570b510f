//! The training kernels of [`LayerSkipBackend`] on Flex, each of which `Autodiff<Flex>` registers
//! as one backward step: the exit head fused with cross-entropy
//! (`layerskip_kernels::cpu::cross_entropy`) and causal self-attention over whole sequences
//! (`layerskip_kernels::cpu::attention_train`). f32, or bf16/f16 inputs widened to f32 (f32
//! arithmetic, results rounded once to the inputs' dtype).

use std::borrow::Cow;

use burn::backend::Flex;
use burn::nn::RmsNorm;
use burn::tensor::{DType, Int, Tensor};
use burn_flex::FlexTensor;
use layerskip_kernels::cpu;
use layerskip_kernels::cpu::attention_train::{
    SelfAttentionShape, causal_attention_backward, causal_attention_forward,
};
use layerskip_kernels::cpu::cross_entropy::{self, HeadGrads, HeadLayout, HeadShape};
use layerskip_kernels::cpu::linear::{self, LinearShape, Operands};

use super::flex::{from_f32, from_f32_vec, is_row_dtype, raw, to_f32, values, wrap};
use super::{Head, HeadLoss, SelfAttention};
use crate::rope::RopeTables;

/// See [`LayerSkipBackend::head_cross_entropy`](super::LayerSkipBackend::head_cross_entropy):
/// f32, or bf16/f16 inputs widened to f32 (f32 arithmetic, gradients rounded once to the
/// inputs' dtype); `None` for other dtypes. `bf16` products for f32 inputs where the CPU has them.
pub(super) fn head_cross_entropy(
    x: Tensor<Flex, 2>,
    head: &Head<Flex>,
    bf16: bool,
    targets: Tensor<Flex, 1, Int>,
    weights: Tensor<Flex, 1>,
    grads: bool,
) -> Option<HeadLoss<Flex>> {
    let (w, layout) = match head {
        Head::Tied(embed) => (embed.clone(), HeadLayout::OutIn),
        Head::Untied(weight) => (weight.clone(), HeadLayout::InOut),
    };
    let dtype = x.dtype();
    if w.dtype() != dtype || !is_row_dtype(dtype) {
        return None;
    }
    let [rows, hidden] = x.dims();
    let w_dims = w.dims();
    let vocab = match layout {
        HeadLayout::OutIn => w_dims[0],
        HeadLayout::InOut => w_dims[1],
    };
    let shape = HeadShape {
        rows,
        hidden,
        vocab,
        layout,
        operands: operands(bf16 && dtype == DType::F32),
    };
    let targets: Vec<u32> = targets
        .into_data()
        .iter::<i64>()
        .map(|t| u32::try_from(t).expect("token ids are non-negative"))
        .collect();
    let weights: Vec<f32> = weights.into_data().iter::<f32>().collect();
    let (x, w) = (raw(x), raw(w));
    let xs = as_f32(&x, rows * hidden);
    let ws = as_f32(&w, vocab * hidden);
    let (mut dx, mut dw) = if grads {
        (vec![0f32; xs.len()], vec![0f32; ws.len()])
    } else {
        (Vec::new(), Vec::new())
    };
    let slots = grads.then(|| HeadGrads {
        x: &mut dx,
        w: &mut dw,
    });
    let loss = cross_entropy::head_cross_entropy(&xs, &ws, &shape, &targets, &weights, slots);
    let loss = wrap(from_f32(&[loss as f32], vec![1], DType::F32));
    let grads = grads.then(|| {
        (
            wrap(from_f32_vec(dx, vec![rows, hidden], dtype)),
            wrap(from_f32_vec(dw, w_dims.to_vec(), dtype)),
        )
    });
    Some(HeadLoss { loss, grads })
}

/// See [`LayerSkipBackend::self_attention_forward`](super::LayerSkipBackend::self_attention_forward).
pub(super) fn self_attention_forward(
    q: Tensor<Flex, 4>,
    k: Tensor<Flex, 4>,
    v: Tensor<Flex, 4>,
) -> Option<SelfAttention<Flex>> {
    let shape = attention_shape(&q, &k, &v)?;
    let dtype = q.dtype();
    let SelfAttentionShape {
        batch: b,
        seq: s,
        heads,
        head_dim: d,
        ..
    } = shape;
    let [q, k, v] = [q, k, v].map(raw);
    let (nq, nk) = (b * s * heads * d, k.layout().shape().num_elements());
    let mut out = vec![0f32; nq];
    let mut lse = vec![0f32; b * heads * s];
    let (qs, ks, vs) = (as_f32(&q, nq), as_f32(&k, nk), as_f32(&v, nk));
    causal_attention_forward(&qs, &ks, &vs, &shape, &mut out, &mut lse);
    Some(SelfAttention {
        out: wrap(from_f32_vec(out, vec![b, s, heads * d], dtype)),
        lse: wrap(from_f32_vec(lse, vec![b, heads, s], DType::F32)),
    })
}

/// See [`LayerSkipBackend::self_attention_backward`](super::LayerSkipBackend::self_attention_backward).
pub(super) fn self_attention_backward(
    [q, k, v]: [Tensor<Flex, 4>; 3],
    forward: SelfAttention<Flex>,
    dout: Tensor<Flex, 3>,
) -> [Tensor<Flex, 4>; 3] {
    let shape = attention_shape(&q, &k, &v).expect("the shapes the forward took");
    let (dtype, q_dims, k_dims) = (q.dtype(), q.dims().to_vec(), k.dims().to_vec());
    let [q, k, v] = [q, k, v].map(raw);
    let (nq, nk) = (q_dims.iter().product(), k_dims.iter().product());
    let [out, dout] = [forward.out, dout].map(raw);
    let lse = raw(forward.lse);
    let lse = as_f32(&lse, lse.layout().shape().num_elements());
    let (qs, ks, vs) = (as_f32(&q, nq), as_f32(&k, nk), as_f32(&v, nk));
    let (outs, douts) = (as_f32(&out, nq), as_f32(&dout, nq));
    let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
    causal_attention_backward(
        [&qs, &ks, &vs],
        &outs,
        &lse,
        &douts,
        &shape,
        [&mut dq, &mut dk, &mut dv],
    );
    [
        wrap(from_f32_vec(dq, q_dims, dtype)),
        wrap(from_f32_vec(dk, k_dims.clone(), dtype)),
        wrap(from_f32_vec(dv, k_dims, dtype)),
    ]
}

/// The kernel's shape for these inputs, or `None` where it does not take them.
fn attention_shape(
    q: &Tensor<Flex, 4>,
    k: &Tensor<Flex, 4>,
    v: &Tensor<Flex, 4>,
) -> Option<SelfAttentionShape> {
    let dtype = q.dtype();
    let [batch, seq, heads, head_dim] = q.dims();
    let [kb, ks, kv_heads, kd] = k.dims();
    let same = k.dtype() == dtype && v.dtype() == dtype && v.dims() == k.dims();
    let fits = (kb, ks, kd) == (batch, seq, head_dim) && kv_heads > 0 && heads % kv_heads == 0;
    (same && fits && is_row_dtype(dtype) && seq > 0).then_some(SelfAttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
    })
}

/// See [`LayerSkipBackend::rms_norm_backward`](super::LayerSkipBackend::rms_norm_backward).
pub(super) fn rms_norm_backward(
    norm: &RmsNorm<Flex>,
    x: Tensor<Flex, 3>,
    dy: Tensor<Flex, 3>,
) -> (Tensor<Flex, 3>, Tensor<Flex, 1>) {
    let (dims, dtype) = (x.dims().to_vec(), x.dtype());
    let gain = norm.gamma.val();
    let (h, gain_dtype) = (gain.dims()[0], gain.dtype());
    let n = dims.iter().product();
    let [x, dy] = [x, dy].map(raw);
    let gain = raw(gain);
    let (mut dx, mut d_gain) = (vec![0f32; n], vec![0f32; h]);
    cpu::norm::rms_norm_backward(
        &as_f32(&x, n),
        &as_f32(&gain, h),
        norm.epsilon as f32,
        &as_f32(&dy, n),
        &mut dx,
        &mut d_gain,
    );
    (
        wrap(from_f32_vec(dx, dims, dtype)),
        wrap(from_f32_vec(d_gain, vec![h], gain_dtype)),
    )
}

/// See [`LayerSkipBackend::silu_mul_backward`](super::LayerSkipBackend::silu_mul_backward).
pub(super) fn silu_mul_backward(
    gate: Tensor<Flex, 3>,
    up: Tensor<Flex, 3>,
    dy: Tensor<Flex, 3>,
) -> [Tensor<Flex, 3>; 2] {
    let (dims, dtype) = (gate.dims().to_vec(), gate.dtype());
    let n = dims.iter().product();
    let [g, u, d] = [gate, up, dy].map(raw);
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
    cpu::silu_mul_backward(
        &as_f32(&g, n),
        &as_f32(&u, n),
        &as_f32(&d, n),
        &mut dg,
        &mut du,
    );
    [dg, du].map(|t| wrap(from_f32_vec(t, dims.clone(), dtype)))
}

/// See [`LayerSkipBackend::rope_backward`](super::LayerSkipBackend::rope_backward).
pub(super) fn rope_backward(dy: Tensor<Flex, 4>, tables: &RopeTables<Flex>) -> Tensor<Flex, 4> {
    let (dims, dtype) = (dy.dims(), dy.dtype());
    let (n, table) = (dims.iter().product(), dims[1] * dims[3]);
    let [d, cos, sin] = [dy, tables.cos.clone(), tables.sin.clone()].map(raw);
    let mut dx = vec![0f32; n];
    let (cos, sin) = (as_f32(&cos, table), as_f32(&sin, table));
    cpu::rope_backward(&as_f32(&d, n), &cos, &sin, &mut dx, dims);
    wrap(from_f32_vec(dx, dims.to_vec(), dtype))
}

/// See [`LayerSkipBackend::linear_forward`](super::LayerSkipBackend::linear_forward): f32
/// inputs only (under bf16 products the tensors stay f32; a model cast to bf16 takes Burn's
/// matmul).
pub(super) fn linear_forward(
    x: Tensor<Flex, 2>,
    w: Tensor<Flex, 2>,
    bf16: bool,
) -> Option<Tensor<Flex, 2>> {
    let shape = linear_shape(&x, &w)?;
    let [x, w] = [x, w].map(raw);
    let mut y = vec![0f32; shape.rows * shape.outputs];
    linear::forward(&mut y, values(&x), values(&w), shape, operands(bf16));
    Some(wrap(from_f32_vec(
        y,
        vec![shape.rows, shape.outputs],
        DType::F32,
    )))
}

/// See [`LayerSkipBackend::linear_backward`](super::LayerSkipBackend::linear_backward).
pub(super) fn linear_backward(
    x: Tensor<Flex, 2>,
    w: Tensor<Flex, 2>,
    dy: Tensor<Flex, 2>,
    bf16: bool,
) -> [Tensor<Flex, 2>; 2] {
    let shape = linear_shape(&x, &w).expect("the inputs the forward took");
    let LinearShape {
        rows,
        inputs,
        outputs,
    } = shape;
    let [x, w, dy] = [x, w, dy].map(raw);
    let (mut dx, mut dw) = (vec![0f32; rows * inputs], vec![0f32; inputs * outputs]);
    let (xs, ws, dys) = (values(&x), values(&w), values(&dy));
    linear::backward(&mut dx, &mut dw, xs, ws, dys, shape, operands(bf16));
    [
        wrap(from_f32_vec(dx, vec![rows, inputs], DType::F32)),
        wrap(from_f32_vec(dw, vec![inputs, outputs], DType::F32)),
    ]
}

fn operands(bf16: bool) -> Operands {
    if bf16 { Operands::Bf16 } else { Operands::F32 }
}

/// The kernel's shape for `x · w`, or `None` where it does not take these inputs.
fn linear_shape(x: &Tensor<Flex, 2>, w: &Tensor<Flex, 2>) -> Option<LinearShape> {
    let ([rows, inputs], [k, outputs]) = (x.dims(), w.dims());
    let f32s = x.dtype() == DType::F32 && w.dtype() == DType::F32;
    (f32s && k == inputs && rows * inputs * outputs > 0).then_some(LinearShape {
        rows,
        inputs,
        outputs,
    })
}

/// The first `len` values of a contiguous f32, bf16 or f16 tensor as f32: borrowed for f32.
fn as_f32(t: &FlexTensor, len: usize) -> Cow<'_, [f32]> {
    match t.dtype() {
        DType::F32 => Cow::Borrowed(&values::<f32>(t)[..len]),
        _ => Cow::Owned(to_f32(t, len)),
    }
}
