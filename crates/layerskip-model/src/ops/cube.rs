//! [`LayerSkipBackend`] for the CubeCL backends (CUDA; wgpu on Vulkan, Metal or DX12): each op
//! is one launch of a kernel from `layerskip_kernels::cube` where Burn's ops take several.
//!
//! Decoding on a GPU is bound by launches, not arithmetic. Attention reads the cache buffers in
//! place with the held length as a launch argument, so a decode step launches the same kernels
//! with the same shapes whatever the context holds: nothing is compiled or tuned again per
//! token. Products of at most [`MAX_ROWS`] rows compute each row alone, so self-speculative
//! verification reproduces autoregressive decoding bit for bit.
//!
//! `LAYERSKIP_CUBE_KERNELS=0` in the environment turns the kernels off (Burn's ops throughout),
//! to compare the two in one build.

use std::sync::OnceLock;

use burn::nn::RmsNorm;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use layerskip_kernels::cube::{self as kernels, Epilogue, FusedRows};

use super::{Head, LayerSkipBackend, Packed, burn_ops};
use crate::rope::RopeTables;

/// Most rows the product kernels take; longer inputs (prefill) use Burn's matmul.
pub const MAX_ROWS: usize = 32;

static KERNELS_ON: OnceLock<bool> = OnceLock::new();

/// Whether the CubeCL backends run these kernels (on unless [`set_kernels_enabled`] said
/// otherwise first).
pub fn kernels_enabled() -> bool {
    *KERNELS_ON.get_or_init(|| true)
}

/// Switches the kernels on or off for this process (off: Burn's ops, to compare), before the
/// first op; false, changing nothing, if that was decided already.
pub fn set_kernels_enabled(on: bool) -> bool {
    KERNELS_ON.set(on).is_ok()
}

/// The CubeCL tensor behind a float tensor, contiguous.
fn raw<
    R: CubeRuntime,
    B: burn::tensor::backend::Backend<FloatTensorPrimitive = CubeTensor<R>>,
    const D: usize,
>(
    t: Tensor<B, D>,
) -> CubeTensor<R> {
    into_contiguous(t.into_primitive().tensor())
}

fn wrap<
    R: CubeRuntime,
    B: burn::tensor::backend::Backend<FloatTensorPrimitive = CubeTensor<R>>,
    const D: usize,
>(
    t: CubeTensor<R>,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// An uninitialised tensor of `like`'s dtype on its device.
fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Vec<usize>) -> CubeTensor<R> {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        like.dtype,
    )
}

/// Whether the kernels take tensors of these dtypes: one float type throughout.
fn takes(dtypes: &[DType]) -> bool {
    kernels_enabled()
        && matches!(dtypes[0], DType::F32 | DType::F16 | DType::BF16)
        && dtypes.iter().all(|d| *d == dtypes[0])
}

/// Whether the product kernels take `x` `[batch, seq, _]` with tensors of these dtypes.
fn fusable(x: [usize; 3], dtypes: &[DType]) -> bool {
    x[0] * x[1] <= MAX_ROWS && takes(dtypes)
}

/// An RMSNorm's gain and epsilon, as the kernels take them.
fn norm_of<
    B: burn::tensor::backend::Backend<FloatTensorPrimitive = CubeTensor<R>>,
    R: CubeRuntime,
>(
    norm: &RmsNorm<B>,
) -> (CubeTensor<R>, f32) {
    (raw(norm.gamma.val()), norm.epsilon as f32)
}

/// Weights as the product kernels read them, all in one layout.
struct Weights<R: CubeRuntime> {
    tensors: Vec<CubeTensor<R>>,
    /// Stored `[out, in]` (rows are outputs) rather than `[in, out]`.
    out_in: bool,
}

impl<R: CubeRuntime> Weights<R> {
    /// `weights` (the model's `[in, out]` tensors): their `[out, in]` storage where they are
    /// transposed views of one, else contiguous `[in, out]`; `None` when the layouts differ.
    fn of<B, const N: usize>(weights: [Tensor<B, 2>; N]) -> Option<Self>
    where
        B: burn::tensor::backend::Backend<FloatTensorPrimitive = CubeTensor<R>>,
    {
        let stored = |w: &Tensor<B, 2>| {
            let t = w.clone().transpose().into_primitive().tensor();
            t.is_contiguous().then_some(t)
        };
        let out_in: Vec<CubeTensor<R>> = weights.iter().filter_map(stored).collect();
        if out_in.len() == N {
            return Some(Self {
                tensors: out_in,
                out_in: true,
            });
        }
        out_in.is_empty().then(|| Self {
            tensors: weights.into_iter().map(raw).collect(),
            out_in: false,
        })
    }

    /// An embedding `[vocab, hidden]`: already rows per output.
    fn embedding(e: CubeTensor<R>) -> Self {
        Self {
            tensors: vec![e],
            out_in: true,
        }
    }

    /// Each weight's outputs.
    fn widths(&self) -> [usize; 3] {
        let mut widths = [0; 3];
        let axis = if self.out_in { 0 } else { 1 };
        for (w, t) in widths.iter_mut().zip(&self.tensors) {
            *w = t.meta.shape()[axis];
        }
        widths
    }
}

/// One product launch on `x` `[batch, seq, k]` with 1 to 3 weights: one output per weight (one
/// for the residual and SwiGLU epilogues), `[batch, seq, n_i]`; `cols` cuts the first weight's
/// outputs to a prefix (`[out, in]` weights only). Unused inputs are bound to `x`, unused
/// outputs to one-element scratch tensors.
fn fused<R: CubeRuntime>(
    x: CubeTensor<R>,
    norm: Option<(CubeTensor<R>, f32)>,
    residual: Option<CubeTensor<R>>,
    (weights, cols): (&Weights<R>, Option<usize>),
    epilogue: Epilogue,
) -> Vec<CubeTensor<R>> {
    let shape = x.meta.shape().clone();
    let (b, s, k) = (shape[0], shape[1], shape[2]);
    let mut widths = weights.widths();
    if let Some(cols) = cols {
        widths[0] = cols;
    }
    let outputs = match epilogue {
        Epilogue::Plain => weights.tensors.len(),
        _ => 1,
    };
    let outs: Vec<CubeTensor<R>> = (0..3)
        .map(|i| match i < outputs {
            true => empty(&x, vec![b, s, widths[i]]),
            false => empty(&x, vec![1]),
        })
        .collect();
    let (client, dtype) = (x.client.clone(), x.dtype.into());
    let arg = |t: &CubeTensor<R>| t.clone().into_tensor_arg();
    let weight = |i: usize| arg(weights.tensors.get(i).unwrap_or(&weights.tensors[0]));
    let tensors = FusedRows {
        x: arg(&x),
        gamma: norm.as_ref().map_or_else(|| arg(&x), |n| arg(&n.0)),
        residual: residual.as_ref().map_or_else(|| arg(&x), arg),
        weights: [weight(0), weight(1), weight(2)],
        outputs: [arg(&outs[0]), arg(&outs[1]), arg(&outs[2])],
    };
    let (eps, rows) = (norm.map(|n| n.1), [b * s, k]);
    if weights.out_in {
        kernels::launch_fused_out_in(&client, tensors, rows, widths, eps, epilogue, dtype);
    } else {
        kernels::launch_fused_rows(&client, tensors, rows, widths, eps, epilogue, dtype);
    }
    outs.into_iter().take(outputs).collect()
}

/// A cache buffer to write in place: the cache holds its buffers alone unless it was cloned
/// (then a copy).
fn owned<
    R: CubeRuntime,
    B: burn::tensor::backend::Backend<FloatTensorPrimitive = CubeTensor<R>>,
>(
    t: Tensor<B, 4>,
) -> CubeTensor<R> {
    let t = raw(t);
    if t.can_mut() { t } else { t.copy() }
}

/// The one output of a single-output launch.
fn single<R: CubeRuntime>(outputs: Vec<CubeTensor<R>>) -> CubeTensor<R> {
    outputs.into_iter().next().expect("one output")
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LayerSkipBackend
    for CubeBackend<R, F, I, BT>
{
    fn product(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        _: &Packed,
        cols: usize,
    ) -> Tensor<Self, 3> {
        let full = cols == weight.dims()[1];
        let dtypes = [x.dtype(), weight.dtype()];
        match Weights::of([weight.clone()]).filter(|_| full && fusable(x.dims(), &dtypes)) {
            Some(w) => wrap(single(fused(
                raw(x),
                None,
                None,
                (&w, None),
                Epilogue::Plain,
            ))),
            None => burn_ops::product(x, weight, cols),
        }
    }

    fn tied_product(
        x: Tensor<Self, 3>,
        embed: Tensor<Self, 2>,
        _: &Packed,
        vocab: usize,
    ) -> Tensor<Self, 3> {
        if !fusable(x.dims(), &[x.dtype(), embed.dtype()]) {
            return burn_ops::tied_product(x, embed, vocab);
        }
        let e = Weights::embedding(raw(embed));
        wrap(single(fused(
            raw(x),
            None,
            None,
            (&e, Some(vocab)),
            Epilogue::Plain,
        )))
    }

    fn rms_norm(norm: &RmsNorm<Self>, x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let gamma = norm.gamma.val();
        if !takes(&[x.dtype(), gamma.dtype()]) {
            return norm.forward(x);
        }
        let [b, s, h] = x.dims();
        let (x, gamma) = (raw(x), raw(gamma));
        let out = empty(&x, vec![b, s, h]);
        let (client, dtype) = (x.client.clone(), x.dtype.into());
        let (xa, ga, oa) = (
            x.into_tensor_arg(),
            gamma.into_tensor_arg(),
            out.clone().into_tensor_arg(),
        );
        kernels::launch_rms_norm(&client, xa, ga, oa, b * s, h, norm.epsilon as f32, dtype);
        wrap(out)
    }

    fn silu_mul(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        if gate.dims() != up.dims() || !takes(&[gate.dtype(), up.dtype()]) {
            return burn_ops::silu_mul(gate, up);
        }
        let dims = gate.dims();
        let (g, u) = (raw(gate), raw(up));
        let out = empty(&g, dims.to_vec());
        let (client, dtype) = (g.client.clone(), g.dtype.into());
        let len = dims.iter().product();
        let (ga, ua, oa) = (
            g.into_tensor_arg(),
            u.into_tensor_arg(),
            out.clone().into_tensor_arg(),
        );
        kernels::launch_silu_mul(&client, ga, ua, oa, len, dtype);
        wrap(out)
    }

    fn rope(x: Tensor<Self, 4>, tables: &RopeTables<Self>) -> Tensor<Self, 4> {
        if !takes(&[x.dtype(), tables.cos.dtype(), tables.sin.dtype()]) {
            return burn_ops::rope(x, tables);
        }
        let dims = x.dims();
        let (x, cos, sin) = (raw(x), raw(tables.cos.clone()), raw(tables.sin.clone()));
        let out = empty(&x, dims.to_vec());
        let (client, dtype) = (x.client.clone(), x.dtype.into());
        let args = [x, cos, sin, out.clone()].map(CubeTensor::into_tensor_arg);
        let [xa, ca, sa, oa] = args;
        kernels::launch_rope(&client, xa, ca, sa, oa, dims, dtype);
        wrap(out)
    }

    fn store_kv(
        [key_cache, value_cache]: [Tensor<Self, 4>; 2],
        at: usize,
        keys: Tensor<Self, 4>,
        values: Tensor<Self, 4>,
        tables: &RopeTables<Self>,
    ) -> [Tensor<Self, 4>; 2] {
        let dtypes = [
            key_cache.dtype(),
            value_cache.dtype(),
            keys.dtype(),
            values.dtype(),
        ];
        if !takes(&dtypes) || !takes(&[dtypes[0], tables.cos.dtype(), tables.sin.dtype()]) {
            return burn_ops::store_kv([key_cache, value_cache], at, keys, values, tables);
        }
        let dims = keys.dims();
        let capacity = key_cache.dims()[2];
        let (kc, vc) = (owned(key_cache), owned(value_cache));
        let (k, v) = (raw(keys), raw(values));
        let (cos, sin) = (raw(tables.cos.clone()), raw(tables.sin.clone()));
        let (client, dtype) = (k.client.clone(), k.dtype.into());
        let to = kernels::StoreAt {
            key_cache: kc.clone().into_tensor_arg(),
            value_cache: vc.clone().into_tensor_arg(),
            capacity,
            at,
        };
        let [ka, va, ca, sa] = [k, v, cos, sin].map(CubeTensor::into_tensor_arg);
        kernels::launch_store_kv(&client, ka, va, ca, sa, to, dims, dtype);
        [wrap(kc), wrap(vc)]
    }

    fn attend_cached(
        q: Tensor<Self, 4>,
        tables: &RopeTables<Self>,
        [key_cache, value_cache]: [&Tensor<Self, 4>; 2],
        len: usize,
        groups: usize,
    ) -> Tensor<Self, 3> {
        let [batch, seq, heads, dim] = q.dims();
        let dtypes = [
            q.dtype(),
            key_cache.dtype(),
            value_cache.dtype(),
            tables.cos.dtype(),
            tables.sin.dtype(),
        ];
        if dim > kernels::ATTEND_MAX_HEAD_DIM || !takes(&dtypes) {
            let q = Self::rope(q, tables);
            return burn_ops::attend_cached(q, [key_cache, value_cache], len, groups);
        }
        let capacity = key_cache.dims()[2];
        let (cos, sin) = (raw(tables.cos.clone()), raw(tables.sin.clone()));
        let (q, k, v) = (raw(q), raw(key_cache.clone()), raw(value_cache.clone()));
        let out = empty(&q, vec![batch, seq, heads, dim]);
        let (client, dtype) = (q.client.clone(), q.dtype.into());
        let args = kernels::AttendArgs {
            batch,
            seq,
            heads,
            groups,
            dim,
            capacity,
            start: len - seq,
            scale: 1.0 / (dim as f32).sqrt(),
        };
        let bufs = [q, cos, sin, k, v, out.clone()].map(CubeTensor::into_tensor_arg);
        kernels::launch_attend(&client, bufs, args, dtype);
        wrap::<R, Self, 4>(out).reshape([batch, seq, heads * dim])
    }

    fn attention_inputs(
        x: Tensor<Self, 3>,
        norm: &RmsNorm<Self>,
        weights: [Tensor<Self, 2>; 3],
        packed: [&Packed; 3],
    ) -> [Tensor<Self, 3>; 3] {
        let mut dtypes = vec![x.dtype(), norm.gamma.dtype()];
        dtypes.extend(weights.iter().map(Tensor::dtype));
        let w = Weights::of(weights.clone()).filter(|_| fusable(x.dims(), &dtypes));
        let Some(w) = w else {
            return burn_ops::attention_inputs::<Self>(x, norm, weights, packed);
        };
        let out = fused(
            raw(x),
            Some(norm_of(norm)),
            None,
            (&w, None),
            Epilogue::Plain,
        );
        let mut out = out.into_iter().map(wrap);
        std::array::from_fn(|_| out.next().expect("three outputs"))
    }

    fn attention_inputs_stored(
        x: Tensor<Self, 3>,
        norm: &RmsNorm<Self>,
        (weights, packed): ([Tensor<Self, 2>; 3], [&Packed; 3]),
        (caches, at, tables): ([Tensor<Self, 4>; 2], usize, &RopeTables<Self>),
    ) -> (Tensor<Self, 3>, [Tensor<Self, 4>; 2]) {
        let [b, s, hidden] = x.dims();
        let [_, _, capacity, head_dim] = caches[0].dims();
        let mut dtypes = vec![x.dtype(), norm.gamma.dtype(), tables.cos.dtype()];
        dtypes.extend(caches.iter().map(Tensor::dtype));
        dtypes.extend(weights.iter().map(Tensor::dtype));
        dtypes.push(tables.sin.dtype());
        // `[in, out]` weights whose key heads each fall within one cube's columns.
        let x_raw = raw(x.clone());
        let (client, dtype) = (x_raw.client.clone(), x_raw.dtype.into());
        let w = Weights::of(weights.clone()).filter(|w| {
            !w.out_in
                && fusable(x.dims(), &dtypes)
                && kernels::stores_whole_heads(&client, w.widths(), dtype, head_dim)
        });
        let Some(w) = w else {
            let store = (caches, at, tables);
            return burn_ops::attention_inputs_stored(x, norm, (weights, packed), store);
        };
        let [key_cache, value_cache] = caches;
        let (kc, vc) = (owned(key_cache), owned(value_cache));
        let widths = w.widths();
        let q = empty(&x_raw, vec![b, s, widths[0]]);
        let (gamma, eps) = norm_of(norm);
        let arg = |t: &CubeTensor<R>| t.clone().into_tensor_arg();
        let tensors = FusedRows {
            x: arg(&x_raw),
            gamma: arg(&gamma),
            residual: arg(&x_raw),
            weights: [arg(&w.tensors[0]), arg(&w.tensors[1]), arg(&w.tensors[2])],
            outputs: [arg(&q), arg(&q), arg(&q)],
        };
        let to = kernels::StoreAt {
            key_cache: arg(&kc),
            value_cache: arg(&vc),
            capacity,
            at,
        };
        let rope = [tables.cos.clone(), tables.sin.clone()].map(|t| raw(t).into_tensor_arg());
        let shape = [b, s, hidden];
        let launched = kernels::launch_fused_qkv_store(
            &client,
            tensors,
            rope,
            to,
            shape,
            head_dim,
            widths,
            Some(eps),
            dtype,
        );
        debug_assert!(launched, "whole heads were checked");
        (wrap(q), [wrap(kc), wrap(vc)])
    }

    fn product_add(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        packed: &Packed,
        residual: Tensor<Self, 3>,
    ) -> Tensor<Self, 3> {
        let dtypes = [x.dtype(), weight.dtype(), residual.dtype()];
        let w = Weights::of([weight.clone()]).filter(|_| fusable(x.dims(), &dtypes));
        let Some(w) = w else {
            let n = weight.dims()[1];
            return residual + Self::product(x, weight, packed, n);
        };
        let out = fused(
            raw(x),
            None,
            Some(raw(residual)),
            (&w, None),
            Epilogue::Residual,
        );
        wrap(single(out))
    }

    fn swiglu(
        x: Tensor<Self, 3>,
        norm: &RmsNorm<Self>,
        weights: [Tensor<Self, 2>; 2],
        packed: [&Packed; 2],
    ) -> Tensor<Self, 3> {
        let dtypes = [
            x.dtype(),
            norm.gamma.dtype(),
            weights[0].dtype(),
            weights[1].dtype(),
        ];
        let w = Weights::of(weights.clone()).filter(|_| fusable(x.dims(), &dtypes));
        let Some(w) = w else {
            return burn_ops::swiglu::<Self>(x, norm, weights, packed);
        };
        let out = fused(
            raw(x),
            Some(norm_of(norm)),
            None,
            (&w, None),
            Epilogue::SwiGlu,
        );
        wrap(single(out))
    }

    fn exit_logits(
        x: Tensor<Self, 3>,
        norm: &RmsNorm<Self>,
        head: Head<Self>,
        packed: &Packed,
        vocab: usize,
    ) -> Tensor<Self, 3> {
        let (Head::Tied(w) | Head::Untied(w)) = &head;
        let dtypes = [x.dtype(), norm.gamma.dtype(), w.dtype()];
        let weights = match &head {
            Head::Tied(e) => Some(Weights::embedding(raw(e.clone()))),
            Head::Untied(w) => Weights::of([w.clone()]),
        };
        // A column prefix of an `[in, out]` head (a draft over part of the vocabulary) is left to
        // Burn; an `[out, in]` head reads its first rows.
        let weights =
            weights.filter(|w| fusable(x.dims(), &dtypes) && (w.out_in || w.widths()[0] == vocab));
        let Some(w) = weights else {
            return burn_ops::exit_logits::<Self>(x, norm, head, packed, vocab);
        };
        let norm = Some(norm_of(norm));
        wrap(single(fused(
            raw(x),
            norm,
            None,
            (&w, Some(vocab)),
            Epilogue::Plain,
        )))
    }
}
