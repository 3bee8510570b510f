//! The defaults of [`LayerSkipBackend`], in Burn's ops: what every backend can run and what the
//! fast paths fall back to for inputs their kernels do not take.

use burn::nn::RmsNorm;
use burn::tensor::activation::silu;
use burn::tensor::{Bool, Int, Tensor, backend::Backend};

use super::{Head, LayerSkipBackend, Packed, SelfAttention, causal_attention, repeat_kv};
use crate::rope::RopeTables;

/// See [`LayerSkipBackend::product`].
pub fn product<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 2>, cols: usize) -> Tensor<B, 3> {
    let [k, n] = weight.dims();
    let weight = if cols == n {
        weight
    } else {
        weight.slice([0..k, 0..cols])
    };
    // One [rows, k] x [k, cols] product rather than a batch of them against a broadcast
    // weight: under autodiff the weight's gradient is then one product over every row
    // instead of one per sequence summed afterwards.
    let [b, s, _] = x.dims();
    x.reshape([b * s, k]).matmul(weight).reshape([b, s, cols])
}

/// See [`LayerSkipBackend::tied_product`].
pub fn tied_product<B: Backend>(
    x: Tensor<B, 3>,
    embed: Tensor<B, 2>,
    vocab: usize,
) -> Tensor<B, 3> {
    let [vocab_size, h] = embed.dims();
    // E · xᵀ keeps the embedding in its stored layout (multiplying by a transposed view of
    // it would copy the whole matrix).
    let embed = if vocab == vocab_size {
        embed
    } else {
        embed.slice([0..vocab, 0..h])
    };
    let [b, s, _] = x.dims();
    let logits = embed.matmul(x.reshape([b * s, h]).transpose()); // [vocab, b * s]
    logits.transpose().reshape([b, s, vocab])
}

/// See [`LayerSkipBackend::silu_mul`].
pub fn silu_mul<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    silu(gate) * up
}

/// See [`LayerSkipBackend::rms_norm_backward`]: with `r = 1 / sqrt(mean(x²) + eps)` per
/// row, `dx = r (g dy - x r² mean(g dy x))`, `d_gain = sum over rows of dy x r`.
pub fn rms_norm_backward<B: Backend>(
    norm: &RmsNorm<B>,
    x: Tensor<B, 3>,
    dy: Tensor<B, 3>,
) -> (Tensor<B, 3>, Tensor<B, 1>) {
    let [b, s, h] = x.dims();
    let gain = norm.gamma.val().reshape([1, 1, h]);
    let r = (x.clone().square().mean_dim(2) + norm.epsilon)
        .sqrt()
        .recip();
    let gdy = dy.clone() * gain;
    let dot = (gdy.clone() * x.clone()).mean_dim(2);
    let dx = (gdy - x.clone() * r.clone().square() * dot) * r.clone();
    let d_gain = (dy * x * r).reshape([b * s, h]).sum_dim(0).reshape([h]);
    (dx, d_gain)
}

/// See [`LayerSkipBackend::silu_mul_backward`]: with `s = sigmoid(gate)`,
/// `[dy * up * s * (1 + gate * (1 - s)), dy * gate * s]`.
pub fn silu_mul_backward<B: Backend>(
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    dy: Tensor<B, 3>,
) -> [Tensor<B, 3>; 2] {
    let s = burn::tensor::activation::sigmoid(gate.clone());
    let d_up = dy.clone() * gate.clone() * s.clone();
    let slope = (s.clone().neg() + 1.0) * gate + 1.0;
    [dy * up * s * slope, d_up]
}

/// See [`LayerSkipBackend::rope_backward`]: with halves `1`, `2` of the last dimension,
/// `[dy1 cos1 + dy2 sin2, dy2 cos2 - dy1 sin1]`.
pub fn rope_backward<B: Backend>(dy: Tensor<B, 4>, tables: &RopeTables<B>) -> Tensor<B, 4> {
    let [_, s, _, d] = dy.dims();
    let half = |t: Tensor<B, 4>, i: usize| t.slice_dim(3, i * d / 2..(i + 1) * d / 2);
    let table = |t: &Tensor<B, 4>| t.clone().reshape([1, s, 1, d]);
    let (cos, sin) = (table(&tables.cos), table(&tables.sin));
    let (g1, g2) = (half(dy.clone(), 0), half(dy, 1));
    let first = g1.clone() * half(cos.clone(), 0) + g2.clone() * half(sin.clone(), 1);
    let second = g2 * half(cos, 1) - g1 * half(sin, 0);
    Tensor::cat(vec![first, second], 3)
}

/// See [`LayerSkipBackend::rope`].
pub fn rope<B: Backend>(x: Tensor<B, 4>, tables: &RopeTables<B>) -> Tensor<B, 4> {
    let [b, s, h, d] = x.dims();
    let table = |t: &Tensor<B, 4>| t.clone().reshape([1, s, 1, d]);
    let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..s, 0..h, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * table(&tables.cos) + rotated * table(&tables.sin)
}

/// See [`LayerSkipBackend::write_at`].
pub fn write_at<B: Backend, const D: usize>(
    buffer: Tensor<B, D>,
    dim: usize,
    at: usize,
    new: Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = new.dims();
    let ranges: [std::ops::Range<usize>; D] = std::array::from_fn(|d| {
        if d == dim {
            at..at + dims[d]
        } else {
            0..dims[d]
        }
    });
    buffer.slice_assign(ranges, new)
}

/// See [`LayerSkipBackend::store_kv`]; the backend's own rope and writes.
pub fn store_kv<B: LayerSkipBackend>(
    [key_cache, value_cache]: [Tensor<B, 4>; 2],
    at: usize,
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    tables: &RopeTables<B>,
) -> [Tensor<B, 4>; 2] {
    let keys = B::rope(keys, tables).swap_dims(1, 2);
    [
        B::write_at(key_cache, 2, at, keys),
        B::write_at(value_cache, 2, at, values.swap_dims(1, 2)),
    ]
}

/// See [`LayerSkipBackend::attention_inputs`]: the backend's norm and products.
pub fn attention_inputs<B: LayerSkipBackend>(
    x: Tensor<B, 3>,
    norm: &RmsNorm<B>,
    weights: [Tensor<B, 2>; 3],
    packed: [&Packed; 3],
) -> [Tensor<B, 3>; 3] {
    let normed = B::rms_norm(norm, x);
    let mut packed = packed.into_iter();
    weights.map(|w| {
        let n = w.dims()[1];
        B::product(normed.clone(), w, packed.next().expect("three"), n)
    })
}

/// See [`LayerSkipBackend::attention_inputs_stored`]: the backend's
/// [`attention_inputs`](LayerSkipBackend::attention_inputs), then its
/// [`store_kv`](LayerSkipBackend::store_kv).
#[allow(clippy::type_complexity)]
pub fn attention_inputs_stored<B: LayerSkipBackend>(
    x: Tensor<B, 3>,
    norm: &RmsNorm<B>,
    (weights, packed): ([Tensor<B, 2>; 3], [&Packed; 3]),
    (caches, at, tables): ([Tensor<B, 4>; 2], usize, &RopeTables<B>),
) -> (Tensor<B, 3>, [Tensor<B, 4>; 2]) {
    let [b, s, _] = x.dims();
    let [_, kv_heads, _, head_dim] = caches[0].dims();
    let [q, k, v] = B::attention_inputs(x, norm, weights, packed);
    let heads = |t: Tensor<B, 3>| t.reshape([b, s, kv_heads, head_dim]);
    let caches = B::store_kv(caches, at, heads(k), heads(v), tables);
    (q, caches)
}

/// See [`LayerSkipBackend::swiglu`]: the backend's norm, products and SwiGLU product.
pub fn swiglu<B: LayerSkipBackend>(
    x: Tensor<B, 3>,
    norm: &RmsNorm<B>,
    [gate, up]: [Tensor<B, 2>; 2],
    [gate_packed, up_packed]: [&Packed; 2],
) -> Tensor<B, 3> {
    let normed = B::rms_norm(norm, x);
    let n = gate.dims()[1];
    let g = B::product(normed.clone(), gate, gate_packed, n);
    B::silu_mul(g, B::product(normed, up, up_packed, n))
}

/// See [`LayerSkipBackend::exit_logits`]: the backend's norm and head product.
pub fn exit_logits<B: LayerSkipBackend>(
    x: Tensor<B, 3>,
    norm: &RmsNorm<B>,
    head: Head<B>,
    packed: &Packed,
    vocab: usize,
) -> Tensor<B, 3> {
    let normed = B::rms_norm(norm, x);
    match head {
        Head::Tied(embed) => B::tied_product(normed, embed, packed, vocab),
        Head::Untied(weight) => B::product(normed, weight, packed, vocab),
    }
}

/// See [`LayerSkipBackend::self_attention`]: kv heads repeated, Burn's attention.
pub fn self_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 3> {
    let groups = q.dims()[2] / k.dims()[2];
    // [batch, seq, kv_heads, head_dim] -> [batch, heads, seq, head_dim]
    let heads = |t: Tensor<B, 4>| repeat_kv(t.swap_dims(1, 2), groups);
    causal_attention(q, heads(k), heads(v))
}

/// See [`LayerSkipBackend::self_attention_backward`]: with `P` recomputed from the
/// log-sum-exp, `dV = Pᵀ dO`, `dS = P ⊙ (dO Vᵀ - rowsum(dO ⊙ O)) / sqrt(d)`, `dQ = dS K`,
/// `dK = dSᵀ Q`, each kv head's gradients summed over the query heads that read it.
pub fn self_attention_backward<B: Backend>(
    [q, k, v]: [Tensor<B, 4>; 3],
    forward: SelfAttention<B>,
    dout: Tensor<B, 3>,
) -> [Tensor<B, 4>; 3] {
    let [b, s, heads, d] = q.dims();
    let kv_heads = k.dims()[2];
    let groups = heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let by_head = |t: Tensor<B, 3>| t.reshape([b, s, heads, d]).swap_dims(1, 2);
    let qh = q.swap_dims(1, 2);
    let kh = repeat_kv(k.swap_dims(1, 2), groups);
    let vh = repeat_kv(v.swap_dims(1, 2), groups);
    // true above the diagonal (`tril_mask` marks what lies outside the lower triangle).
    let future = Tensor::<B, 2, Bool>::tril_mask([s, s], 0, &qh.device())
        .unsqueeze::<4>()
        .expand([b, heads, s, s]);
    let scores = qh.clone().matmul(kh.clone().transpose()) * scale;
    let p = (scores - forward.lse.cast(qh.dtype()).unsqueeze_dim(3))
        .exp()
        .mask_fill(future, 0.0);
    let (dout, out) = (by_head(dout), by_head(forward.out));
    let dv = p.clone().transpose().matmul(dout.clone());
    let delta = (dout.clone() * out).sum_dim(3);
    let ds = p * (dout.matmul(vh.transpose()) - delta) * scale;
    let dq = ds.clone().matmul(kh);
    let dk = ds.transpose().matmul(qh);
    // [batch, heads, seq, d] -> [batch, seq, kv_heads, d], summed over each group.
    let per_kv = |t: Tensor<B, 4>| {
        t.reshape([b, kv_heads, groups, s, d])
            .sum_dim(2)
            .reshape([b, kv_heads, s, d])
            .swap_dims(1, 2)
    };
    [dq.swap_dims(1, 2), per_kv(dk), per_kv(dv)]
}

/// See [`LayerSkipBackend::exit_cross_entropy`]: the head's logits, widened to f32 in half
/// precision (log-softmax over a vocabulary in bf16 loses the small probabilities the loss
/// is made of), log-softmax, the targets' entries.
pub fn exit_cross_entropy<B: Backend>(
    x: Tensor<B, 2>,
    head: Head<B>,
    targets: Tensor<B, 1, Int>,
    weights: Tensor<B, 1>,
) -> Tensor<B, 1> {
    let logits = match head {
        Head::Tied(embed) => x.matmul(embed.transpose()),
        Head::Untied(weight) => x.matmul(weight),
    };
    let logits = if logits.dtype() == weights.dtype() {
        logits
    } else {
        logits.cast(weights.dtype())
    };
    let logp = burn::tensor::activation::log_softmax(logits, 1);
    let picked = logp.gather(1, targets.unsqueeze_dim(1)).squeeze_dim::<1>(1);
    (picked * weights).sum().neg()
}

/// See [`LayerSkipBackend::attend_cached`]: the held prefix, kv heads repeated, Burn's
/// attention.
pub fn attend_cached<B: Backend>(
    q: Tensor<B, 4>,
    [key_cache, value_cache]: [&Tensor<B, 4>; 2],
    len: usize,
    groups: usize,
) -> Tensor<B, 3> {
    let prefix = |t: &Tensor<B, 4>| repeat_kv(t.clone().slice_dim(2, 0..len), groups);
    causal_attention(q, prefix(key_cache), prefix(value_cache))
}
