//! Fast paths for the Flex CPU backend, reached from backend-generic code by a `TypeId` check:
//! the small-row products of [`crate::rows`] and in-place cache writes. Every other backend
//! takes Burn's own ops.

use std::any::{Any, TypeId};

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Element, Shape, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use half::{bf16, f16};

/// Whether `B` is the Flex backend.
pub(crate) fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Flex>()
}

/// Reinterprets a tensor of backend `A` as one of backend `C`; callers check with [`is_flex`]
/// that the two are the same type, so the downcast cannot fail.
pub(crate) fn cast<A: Backend, C: Backend, const D: usize>(t: Tensor<A, D>) -> Tensor<C, D> {
    let boxed: Box<dyn Any> = Box::new(t);
    *boxed
        .downcast::<Tensor<C, D>>()
        .expect("callers check that A and C are the same backend")
}

/// The Flex tensor behind a float tensor of backend `B` (which must be Flex).
pub(crate) fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexTensor {
    cast::<B, Flex, D>(t).into_primitive().tensor()
}

/// A float tensor of backend `B` (which must be Flex) around a Flex tensor.
pub(crate) fn wrap<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    cast::<Flex, B, D>(Tensor::from_primitive(TensorPrimitive::Float(t)))
}

/// `t` itself when it is contiguous, else a contiguous copy.
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// Whether [`write_along`] takes tensors of backend `B` with these dtypes.
pub(crate) fn can_write_along<B: Backend>(buf: DType, new: DType) -> bool {
    is_flex::<B>() && buf == new && matches!(buf, DType::F32 | DType::F16 | DType::BF16)
}

/// Writes `new` into `buf` at `start..start + new.dims()[dim]` along `dim` (every other dimension
/// whole) and returns `buf`; in place when `buf` holds its storage alone. Only for what
/// [`can_write_along`] accepts.
///
/// Burn 0.21's Flex `slice_assign` copies the whole destination on every call (it keeps a second
/// handle on the storage before asking for it mutably), which made each KV-cache append copy
/// the layer's preallocated buffer: 15% of a self-speculative decode.
pub(crate) fn write_along<B: Backend, const D: usize>(
    buf: Tensor<B, D>,
    start: usize,
    new: Tensor<B, D>,
    dim: usize,
) -> Tensor<B, D> {
    let (dims, added) = (buf.dims(), new.dims()[dim]);
    let mut dst = primitive::<B, D>(buf);
    if !(dst.is_contiguous() && dst.layout().start_offset() == 0) {
        dst = dst.to_contiguous();
    }
    let src = contiguous(primitive::<B, D>(new));
    let inner: usize = dims[dim + 1..].iter().product();
    let geometry = Geometry {
        outer: dims[..dim].iter().product(),
        dst_stride: dims[dim] * inner,
        src_stride: added * inner,
        dst_offset: start * inner,
    };
    match dst.dtype() {
        DType::F32 => geometry.copy::<f32>(&mut dst, &src),
        DType::F16 => geometry.copy::<f16>(&mut dst, &src),
        DType::BF16 => geometry.copy::<bf16>(&mut dst, &src),
        other => unreachable!("can_write_along rejects {other:?}"),
    }
    wrap::<B, D>(dst)
}

/// Whether [`gather_heads`] takes tensors of backend `B` with this dtype.
pub(crate) fn can_gather_heads<B: Backend>(dtype: DType) -> bool {
    is_flex::<B>() && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// `buf[:, h / groups, 0..len, :]` for every head `h < kv_heads * groups`, contiguous
/// `[batch, kv_heads * groups, len, head_dim]`, from a cache buffer `[batch, kv_heads, capacity,
/// head_dim]`: one block copy per head. Only for what [`can_gather_heads`] accepts.
pub(crate) fn gather_heads<B: Backend>(
    buf: &Tensor<B, 4>,
    len: usize,
    groups: usize,
) -> Tensor<B, 4> {
    let [batch, kv_heads, capacity, head_dim] = buf.dims();
    let src = contiguous(primitive::<B, 4>(buf.clone()));
    let heads = kv_heads * groups;
    let mut out = FlexTensor::empty(Shape::from(vec![batch, heads, len, head_dim]), src.dtype());
    fn copy<E: Element + bytemuck::Pod>(
        src: &FlexTensor,
        out: &mut FlexTensor,
        [batch, kv_heads, capacity, head_dim, len, groups]: [usize; 6],
    ) {
        let src: &[E] = &src.storage::<E>()[src.layout().start_offset()..];
        let out: &mut [E] = out.storage_mut::<E>();
        let block = len * head_dim;
        for b in 0..batch {
            for h in 0..kv_heads * groups {
                let s = (b * kv_heads + h / groups) * capacity * head_dim;
                let o = (b * kv_heads * groups + h) * block;
                out[o..o + block].copy_from_slice(&src[s..s + block]);
            }
        }
    }
    let geometry = [batch, kv_heads, capacity, head_dim, len, groups];
    match src.dtype() {
        DType::F32 => copy::<f32>(&src, &mut out, geometry),
        DType::F16 => copy::<f16>(&src, &mut out, geometry),
        DType::BF16 => copy::<bf16>(&src, &mut out, geometry),
        other => unreachable!("can_gather_heads rejects {other:?}"),
    }
    wrap::<B, 4>(out)
}

/// Where the blocks of a write along one dimension go.
struct Geometry {
    /// Blocks (the product of the dimensions before the written one).
    outer: usize,
    /// Elements from one destination block to the next.
    dst_stride: usize,
    /// Elements per source block (contiguous).
    src_stride: usize,
    /// Offset of the written span inside a destination block.
    dst_offset: usize,
}

impl Geometry {
    fn copy<E: Element + bytemuck::Pod>(&self, dst: &mut FlexTensor, src: &FlexTensor) {
        // The buffer was taken out of its cache (`Option::take`), so it is normally unique and
        // `storage_mut` does not copy.
        let src: &[E] = &src.storage::<E>()[src.layout().start_offset()..];
        let dst: &mut [E] = dst.storage_mut::<E>();
        for o in 0..self.outer {
            let d = o * self.dst_stride + self.dst_offset;
            let s = o * self.src_stride;
            dst[d..d + self.src_stride].copy_from_slice(&src[s..s + self.src_stride]);
        }
    }
}

/// Whether `B` is Flex and every dtype is f32: what [`rope_seq_major`] takes.
pub(crate) fn is_flex_f32<B: Backend>(dtypes: &[DType]) -> bool {
    is_flex::<B>() && dtypes.iter().all(|d| *d == DType::F32)
}

/// `silu(gate) * up` elementwise (`gate / (1 + exp(-gate)) * up`, the SwiGLU product) in one
/// pass with a vectorised exp, when `B` is Flex, both are f32 of the same shape and the CPU has
/// AVX2 and FMA; `None` otherwise (Burn's `silu` then a product). Each element is computed alone,
/// so a row's result does not depend on the rows beside it.
pub(crate) fn silu_mul<B: Backend, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    #[cfg(target_arch = "x86_64")]
    {
        let simd = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if !simd || !is_flex_f32::<B>(&[gate.dtype(), up.dtype()]) || gate.dims() != up.dims() {
            return None;
        }
        let g = contiguous(primitive::<B, D>(gate.clone()));
        let u = contiguous(primitive::<B, D>(up.clone()));
        let n = gate.shape().num_elements();
        let gs: &[f32] = &g.storage::<f32>()[g.layout().start_offset()..][..n];
        let us: &[f32] = &u.storage::<f32>()[u.layout().start_offset()..][..n];
        let mut out = FlexTensor::empty(g.layout().shape().clone(), DType::F32);
        // SAFETY: the CPU has AVX2 and FMA (checked above); the slices hold `n` values.
        unsafe { silu_mul_avx2(gs, us, &mut out.storage_mut::<f32>()[..n]) };
        Some(wrap::<B, D>(out))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (gate, up);
        None
    }
}

/// [`silu_mul`] on slices of equal length.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let body = gate.len() / 8 * 8;
    // SAFETY: the offsets stay below `body <= len`; the caller's promise covers the intrinsics.
    unsafe {
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < body {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            let r = _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), r);
            i += 8;
        }
    }
    for i in body..gate.len() {
        out[i] = gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
    }
}

/// Whether [`attend`] and [`write_seq_major`] take these tensors of backend `B`: Flex, f32
/// throughout, at most [`crate::rows::MAX_ROWS`] new rows (decoding and self-speculative
/// verification; prefill keeps Burn's attention).
pub(crate) fn can_attend<B: Backend>(dtypes: &[DType], rows: usize) -> bool {
    rows <= crate::rows::MAX_ROWS && is_flex_f32::<B>(dtypes)
}

/// Writes new keys or values in the projections' layout `[batch, new, kv_heads, head_dim]` into
/// a cache buffer `[batch, kv_heads, capacity, head_dim]` at positions `start..start + new`
/// (in place when the buffer holds its storage alone), and returns the buffer.
pub(crate) fn write_seq_major<B: Backend>(
    buf: Tensor<B, 4>,
    start: usize,
    new: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [batch, kv_heads, capacity, head_dim] = buf.dims();
    let added = new.dims()[1];
    let mut dst = primitive::<B, 4>(buf);
    if !(dst.is_contiguous() && dst.layout().start_offset() == 0) {
        dst = dst.to_contiguous();
    }
    let src = contiguous(primitive::<B, 4>(new));
    let src: &[f32] = &src.storage::<f32>()[src.layout().start_offset()..];
    let out: &mut [f32] = dst.storage_mut::<f32>();
    for b in 0..batch {
        for t in 0..added {
            for g in 0..kv_heads {
                let s = ((b * added + t) * kv_heads + g) * head_dim;
                let o = ((b * kv_heads + g) * capacity + start + t) * head_dim;
                out[o..o + head_dim].copy_from_slice(&src[s..s + head_dim]);
            }
        }
    }
    wrap::<B, 4>(dst)
}

/// Rotary embedding of `x` `[batch, seq, heads, head_dim]` with tables `[1, 1, seq, head_dim]`:
/// `x * cos + rotate_half(x) * sin`, the same operations in the same order as the tensor ops of
/// `RopeTables::apply_seq_major` (so the same bits), in one pass instead of six broadcast ops
/// that Flex walks element by element (6% of a 4-row pass of the default model).
pub(crate) fn rope_seq_major<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [batch, seq, heads, d] = x.dims();
    let x = contiguous(primitive::<B, 4>(x));
    let (cos, sin) = (
        contiguous(primitive::<B, 4>(cos.clone())),
        contiguous(primitive::<B, 4>(sin.clone())),
    );
    let xs: &[f32] = &x.storage::<f32>()[x.layout().start_offset()..];
    let cs: &[f32] = &cos.storage::<f32>()[cos.layout().start_offset()..];
    let ss: &[f32] = &sin.storage::<f32>()[sin.layout().start_offset()..];
    let mut out = FlexTensor::empty(Shape::from(vec![batch, seq, heads, d]), DType::F32);
    let os: &mut [f32] = out.storage_mut::<f32>();
    let half = d / 2;
    for b in 0..batch {
        for t in 0..seq {
            let (c, s) = (&cs[t * d..(t + 1) * d], &ss[t * d..(t + 1) * d]);
            for h in 0..heads {
                let at = ((b * seq + t) * heads + h) * d;
                let (xr, or) = (&xs[at..at + d], &mut os[at..at + d]);
                for i in 0..half {
                    or[i] = xr[i] * c[i] + -xr[i + half] * s[i];
                }
                for i in half..d {
                    or[i] = xr[i] * c[i] + xr[i - half] * s[i];
                }
            }
        }
    }
    wrap::<B, 4>(out)
}

/// Causal grouped-query attention of the `seq` newest positions, `q` `[batch, seq, heads,
/// head_dim]` (rotated), against the first `len` positions of the cache buffers `[batch,
/// kv_heads, capacity, head_dim]` (the new positions written last): query head `h` reads kv
/// head `h / groups` in place, with no gathered copy of the cache. Returns `[batch, seq, heads *
/// head_dim]`, the layout the output projection reads.
///
/// Each query row is computed alone, in the same order whatever `seq` is, so a position's output
/// does not depend on how many rows share the call (self-speculative verification reproduces
/// one-token decoding bit for bit).
pub(crate) fn attend<B: Backend>(
    q: Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    len: usize,
    groups: usize,
) -> Tensor<B, 3> {
    let [batch, seq, heads, d] = q.dims();
    let [_, kv_heads, capacity, _] = keys.dims();
    let q = contiguous(primitive::<B, 4>(q));
    let (k, v) = (
        contiguous(primitive::<B, 4>(keys.clone())),
        contiguous(primitive::<B, 4>(values.clone())),
    );
    let mut out = FlexTensor::empty(Shape::from(vec![batch, seq, heads * d]), DType::F32);
    let shape = AttendShape {
        batch,
        seq,
        heads,
        kv_heads,
        capacity,
        d,
        len,
        groups,
    };
    {
        let qs: &[f32] = &q.storage::<f32>()[q.layout().start_offset()..];
        let ks: &[f32] = &k.storage::<f32>()[k.layout().start_offset()..];
        let vs: &[f32] = &v.storage::<f32>()[v.layout().start_offset()..];
        let os: &mut [f32] = out.storage_mut::<f32>();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { attend_avx2(qs, ks, vs, os, &shape) };
            return wrap::<B, 3>(out);
        }
        attend_rows(qs, ks, vs, os, &shape);
    }
    wrap::<B, 3>(out)
}

/// The dimensions of an [`attend`] call.
struct AttendShape {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    capacity: usize,
    d: usize,
    len: usize,
    groups: usize,
}

impl AttendShape {
    /// Every (query row, head) of the call, in order: the number of keys it sees, the offset of
    /// its kv head's buffer in the cache and the offset of its query (and output) row.
    fn rows(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let (batch, seq, heads) = (self.batch, self.seq, self.heads);
        (0..batch).flat_map(move |b| {
            (0..seq).flat_map(move |t| {
                (0..heads).map(move |h| {
                    let visible = self.len - seq + t + 1;
                    let base = (b * self.kv_heads + h / self.groups) * self.capacity * self.d;
                    (visible, base, ((b * seq + t) * heads + h) * self.d)
                })
            })
        })
    }
}

/// The attention kernel with AVX2 and FMA for head dims of 8 to 128 in whole vectors, else
/// [`attend_rows`]. Per query row and head: scores four keys at a time (each key's dot product
/// its own chain of FMAs over 8-lane vectors, reduced pairwise), a vectorised exp, and the
/// weighted sum of values in registers. Each key's arithmetic and every sum's order depend only
/// on the number of visible keys, never on which other rows share the call.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], shape: &AttendShape) {
    // SAFETY: the CPU has AVX2 and FMA (the caller's promise); the shapes are the caller's.
    unsafe {
        match (shape.d % 8, shape.d / 8) {
            (0, 1) => attend_lanes::<1>(q, k, v, out, shape),
            (0, 2) => attend_lanes::<2>(q, k, v, out, shape),
            (0, 4) => attend_lanes::<4>(q, k, v, out, shape),
            (0, 6) => attend_lanes::<6>(q, k, v, out, shape),
            (0, 8) => attend_lanes::<8>(q, k, v, out, shape),
            (0, 10) => attend_lanes::<10>(q, k, v, out, shape),
            (0, 12) => attend_lanes::<12>(q, k, v, out, shape),
            (0, 16) => attend_lanes::<16>(q, k, v, out, shape),
            _ => attend_rows(q, k, v, out, shape),
        }
    }
}

/// [`attend_avx2`] for head dim `8 * L`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `shape.d == 8 * L`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_lanes<const L: usize>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    shape: &AttendShape,
) {
    use std::arch::x86_64::*;
    let d = shape.d;
    let scale = _mm_set1_ps((1.0 / (d as f64).sqrt()) as f32);
    // Scores, padded to whole vectors.
    let mut weights = vec![0.0f32; shape.len.div_ceil(8) * 8];
    // SAFETY: every offset stays inside the buffers' shapes (`visible <= len <= capacity`).
    unsafe {
        for (visible, base, at) in shape.rows() {
            let (kh, vh) = (k.as_ptr().add(base), v.as_ptr().add(base));
            let qr = q.as_ptr().add(at);
            let mut qv = [_mm256_setzero_ps(); L];
            for (l, x) in qv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(qr.add(l * 8));
            }
            let dot = |j: usize| {
                // Keys past `visible` repeat the last one; their scores are not read.
                let kr = kh.add(j.min(visible - 1) * d);
                let mut acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kr));
                for (l, x) in qv.iter().enumerate().skip(1) {
                    acc = _mm256_fmadd_ps(*x, _mm256_loadu_ps(kr.add(l * 8)), acc);
                }
                acc
            };
            let mut vmax = _mm_set1_ps(f32::NEG_INFINITY);
            let mut j = 0;
            while j < visible {
                let (a0, a1, a2, a3) = (dot(j), dot(j + 1), dot(j + 2), dot(j + 3));
                let sums = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
                let four = _mm_mul_ps(
                    _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1)),
                    scale,
                );
                _mm_storeu_ps(weights.as_mut_ptr().add(j), four);
                vmax = _mm_max_ps(vmax, four);
                j += 4;
            }
            // The padding repeats the last key's score, so it cannot raise the max.
            let vmax = _mm_max_ps(vmax, _mm_movehl_ps(vmax, vmax));
            let vmax = _mm_max_ss(vmax, _mm_shuffle_ps(vmax, vmax, 1));
            let vmax = _mm256_set1_ps(_mm_cvtss_f32(vmax));
            let mut vsum = _mm256_setzero_ps();
            let mut j = 0;
            while j < visible {
                let w = weights.as_mut_ptr().add(j);
                let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(w), vmax));
                // Lanes past `visible` count as zero.
                let live = _mm256_cmp_ps(
                    _mm256_set_ps(7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0),
                    _mm256_set1_ps((visible - j) as f32),
                    _CMP_LT_OQ,
                );
                let e = _mm256_and_ps(e, live);
                _mm256_storeu_ps(w, e);
                vsum = _mm256_add_ps(vsum, e);
                j += 8;
            }
            let hi = _mm256_extractf128_ps(vsum, 1);
            let lo = _mm256_castps256_ps128(vsum);
            // ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
            let pairs = _mm_hadd_ps(lo, hi);
            let quads = _mm_hadd_ps(pairs, pairs);
            let sum = _mm_cvtss_f32(_mm_add_ss(quads, _mm_movehdup_ps(quads)));
            let mut acc = [_mm256_setzero_ps(); L];
            for (j, &w) in weights[..visible].iter().enumerate() {
                let (wv, vr) = (_mm256_set1_ps(w), vh.add(j * d));
                for (l, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(vr.add(l * 8)), *a);
                }
            }
            let inv = _mm256_set1_ps(1.0 / sum);
            let or = out.as_mut_ptr().add(at);
            for (l, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(or.add(l * 8), _mm256_mul_ps(*a, inv));
            }
        }
    }
}

/// `exp(x)` of eight lanes: Cephes' range reduction by `ln 2` and degree-5 polynomial, within
/// 2 ulp of `expf`; arguments below -87.3 give 0, above 88.37 give exp(88.37).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp256(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let lo = _mm256_set1_ps(-87.33654);
    let under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    // Above 88.37 the result would not fit: clamp to ~2.5e38 (SiLU only needs "huge").
    let x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.37));
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    ));
    _mm256_andnot_ps(under, _mm256_mul_ps(p, pow2))
}

/// The attention kernel: per query row and head, scaled dot products with every visible key,
/// a max-subtracted softmax, and the weighted sum of values.
#[inline(always)]
fn attend_rows(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], shape: &AttendShape) {
    let d = shape.d;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let mut weights = vec![0.0f32; shape.len];
    for (visible, base, at) in shape.rows() {
        let (kh, vh) = (&k[base..base + visible * d], &v[base..base + visible * d]);
        let qr = &q[at..at + d];
        let mut max = f32::NEG_INFINITY;
        for (w, kr) in weights.iter_mut().zip(kh.chunks_exact(d)) {
            *w = dot8(qr, kr) * scale;
            max = max.max(*w);
        }
        let mut sum = 0.0f32;
        for w in &mut weights[..visible] {
            *w = (*w - max).exp();
            sum += *w;
        }
        let or = &mut out[at..at + d];
        or.fill(0.0);
        for (&w, vr) in weights.iter().zip(vh.chunks_exact(d)) {
            for (o, &x) in or.iter_mut().zip(vr) {
                *o += w * x;
            }
        }
        let inv = 1.0 / sum;
        for o in or.iter_mut() {
            *o *= inv;
        }
    }
}

/// A dot product as eight lane sums over features `i ≡ lane (mod 8)`, summed pairwise, then
/// the tail: a fixed order that vectorises.
#[inline(always)]
fn dot8(x: &[f32], y: &[f32]) -> f32 {
    let body = x.len() / 8 * 8;
    let mut lanes = [0.0f32; 8];
    for (xc, yc) in x[..body].chunks_exact(8).zip(y[..body].chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += xc[l] * yc[l];
        }
    }
    let mut s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for i in body..x.len() {
        s += x[i] * y[i];
    }
    s
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::arch::x86_64::*;

    /// The vectorised exp against f64's: within 2 ulp from -87.3 to 88.37, 0 below, clamped
    /// above.
    #[test]
    fn exp256_is_within_two_ulp_of_exp() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let xs: Vec<f32> = (-80_000..=80_000).map(|i| -(i as f32) * 0.001_1).collect();
        for chunk in xs.chunks_exact(8) {
            let mut got = [0.0f32; 8];
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe {
                _mm256_storeu_ps(
                    got.as_mut_ptr(),
                    super::exp256(_mm256_loadu_ps(chunk.as_ptr())),
                )
            };
            for (&x, &g) in chunk.iter().zip(&got) {
                let want = (x as f64).exp();
                if x < -87.336_54 {
                    assert_eq!(g, 0.0, "exp({x})");
                } else if x > 88.37 {
                    assert_eq!(g, 88.37f32.exp(), "exp({x})");
                } else {
                    let ulp = f32::EPSILON as f64 * want;
                    assert!(
                        (g as f64 - want).abs() <= 2.0 * ulp,
                        "exp({x}) = {g}, want {want}"
                    );
                }
            }
        }
    }

    /// The fused SwiGLU product against `x * sigmoid(x) * u` in f64, on a Flex tensor with a
    /// tail past the last vector.
    #[test]
    fn silu_mul_matches_the_formula() {
        use burn::backend::Flex;
        use burn::tensor::{Tensor, TensorData};
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let n = 3 * 37;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 55.0) * 0.37).collect();
        let u: Vec<f32> = (0..n).map(|i| 1.5 - (i % 7) as f32 * 0.5).collect();
        let t = |v: &[f32]| {
            Tensor::<Flex, 2>::from_data(TensorData::new(v.to_vec(), [3, 37]), &Default::default())
        };
        let out = super::silu_mul(&t(&g), &t(&u)).expect("Flex f32 with AVX2");
        let got = out.into_data().to_vec::<f32>().unwrap();
        for i in 0..n {
            let (x, y) = (g[i] as f64, u[i] as f64);
            let want = x / (1.0 + (-x).exp()) * y;
            assert!(
                (got[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{i}: {} vs {want}",
                got[i]
            );
        }
    }
}
