//! [`LayerSkipBackend`] for the Flex CPU backend: the slice kernels of `layerskip_kernels::cpu`
//! for decoding, verification and prefill, in-place cache writes, Burn's ops for the rest.
//!
//! - Products of at most [`MAX_ROWS`] f32 rows read a packed copy of the weight (made when a
//!   generator is built, `LlamaModel::prepare_for_decoding`, or else on first use; kept in the
//!   module's [`Packed`]), split by output columns over both cores: Flex sends 2-16 rows
//!   through gemm's packing path, which cost several times one row, so verifying `d + 1`
//!   drafts in one pass saved nothing. The packed copy adds the weights' size again (half of it
//!   for bf16-valued weights).
//! - Attention of at most [`MAX_ROWS`] f32 rows reads the cache buffers in place; longer inputs
//!   gather the kv heads by block copies and take Burn's attention.
//! - Half precision (`--dtype bf16`/`f16`: weights, activations and KV cache in 16 bits): the
//!   same kernels, inputs widened to f32 exactly, f32 arithmetic, outputs rounded once. Products
//!   of any length take the row kernels (Flex's half-precision matmul was 7x slower than f32).
//!   bf16 weights are packed as bf16 (half the bytes streamed); f16 weights are widened into
//!   f32 panels.
//! - Cache writes go in place into the preallocated buffers: Burn 0.21's Flex `slice_assign`
//!   copies the whole destination on every call.

use std::sync::{Arc, Mutex};

use burn::backend::Flex;
use burn::nn::RmsNorm;
use burn::tensor::{DType, Element, Int, Shape, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use half::{bf16, f16};
use layerskip_kernels::cpu::{self, attend::AttendShape, rows::Panels};

use super::{
    Head, HeadLoss, LayerSkipBackend, Packed, Quantization, SelfAttention, WeightLayout as Layout,
    causal_attention,
};
use crate::error::ModelError;
use crate::rope::RopeTables;

mod cache;

use cache::{copy_float_blocks, gather_heads, is_cache_dtype, writable, write_seq_major};

/// Most rows the Flex kernels take in f32; longer inputs (evaluation and training batches) use
/// Burn's matmul and attention. Prompts up to this length are prefilled by the same kernels as
/// decoding (faster than Burn's here: a 125-token SmolLM2 prompt took 152 ms against 262 ms),
/// and self-speculation with `d` drafts verifies `d + 1` rows, so its logits are bit-identical
/// to autoregressive decoding's on Flex f32 for every `d < MAX_ROWS`.
pub const MAX_ROWS: usize = 512;

/// The packed copy of one weight matrix, once made, and the format asked for it.
#[derive(Clone, Default)]
pub(crate) struct PackedSlot(Arc<Mutex<Slot>>);

#[derive(Default)]
struct Slot {
    entry: Option<Arc<Entry>>,
    /// Set by `prepare` with a quantization: every later packing of this weight (after the
    /// weight is replaced, or by a clone of the module) uses it too.
    quantize: Option<Quantization>,
}

impl PackedSlot {
    pub(crate) fn is_packed(&self) -> bool {
        self.0.lock().map(|s| s.entry.is_some()).unwrap_or(false)
    }

    /// Whether `w` is a released weight's stand-in (its packed copy the only one).
    fn is_sole(&self, w: &FlexTensor) -> bool {
        self.sole_entry(w).is_some()
    }

    /// The entry of which `w` is the released weight's stand-in, if it is one.
    fn sole_entry(&self, w: &FlexTensor) -> Option<Arc<Entry>> {
        let slot = self.0.lock().ok()?;
        slot.entry
            .as_ref()
            .filter(|e| e.sole && e.packs(w))
            .cloned()
    }

    /// The packed copy of `w` (f32, or half precision widened exactly), packing it now if it is
    /// not the one held. `quantize` (sticky: later calls without one keep it) packs in that
    /// format where the weight's shape allows (whole blocks of 32 input features; other weights
    /// stay plain). A weight that is not contiguous is made so only to be packed: the held
    /// entry is recognised first (a released weight's stand-in, [`PackedSlot::release`], is
    /// never materialised).
    fn of(
        &self,
        w: FlexTensor,
        layout: Layout,
        k: usize,
        n: usize,
        quantize: Option<Quantization>,
    ) -> Arc<Entry> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if quantize.is_some() {
            slot.quantize = quantize;
        }
        let wanted = slot.quantize;
        let held = slot
            .entry
            .as_ref()
            .filter(|e| e.packs(&w) && (e.quantized == wanted || e.sole));
        if let Some(entry) = held {
            return entry.clone();
        }
        let w = if w.is_contiguous() {
            w
        } else {
            w.to_contiguous()
        };
        let widened;
        let ws: &[f32] = match w.dtype() {
            DType::F32 => &values::<f32>(&w)[..k * n],
            _ => {
                widened = to_f32(&w, k * n);
                &widened
            }
        };
        let out_in = layout == Layout::OutIn;
        let panels = wanted
            .and_then(|q| Panels::quantized(ws, k, n, out_in, q))
            .unwrap_or_else(|| match layout {
                Layout::InOut => Panels::from_in_out(ws, k, n),
                Layout::OutIn => Panels::from_out_in(ws, k, n),
            });
        let entry = Arc::new(Entry {
            source: w,
            quantized: wanted,
            panels: Arc::new(panels),
            sole: false,
        });
        slot.entry = Some(entry.clone());
        entry
    }

    /// Makes the packed copy of `w` the only one: the entry answers for `stand_in` (a tensor of
    /// `w`'s shape that the module keeps instead of `w`, holding no values of its own) and
    /// every product with it computes from the panels, so `w`'s storage can be freed. `false`
    /// (nothing changed) if `w` is not the packed weight.
    fn release(&self, w: &FlexTensor, stand_in: FlexTensor) -> bool {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = slot.entry.as_ref().filter(|e| e.packs(w)) else {
            return false;
        };
        let entry = Arc::new(Entry {
            source: stand_in,
            quantized: entry.quantized,
            panels: entry.panels.clone(),
            sole: true,
        });
        slot.entry = Some(entry);
        true
    }
}

/// A packed matrix and the tensor it was packed from.
pub(crate) struct Entry {
    /// A handle on the source: while it is held the storage is neither freed nor written in
    /// place (Flex writes in place only into storage it holds alone), so a weight replaced by
    /// loading or training is packed again on its next use, never read stale. After
    /// [`PackedSlot::release`], the stand-in the module holds instead.
    source: FlexTensor,
    /// The format asked for when packing (the panels may be plain where the shape did not
    /// allow it; asking again does not repack).
    quantized: Option<Quantization>,
    panels: Arc<Panels>,
    /// The panels are the weight's only copy (released): every product, of any row count,
    /// computes from them.
    sole: bool,
}

impl Entry {
    fn packs(&self, w: &FlexTensor) -> bool {
        std::ptr::eq(self.source.bytes().as_ptr(), w.bytes().as_ptr())
            && self.source.dtype() == w.dtype()
            && self.source.layout() == w.layout()
    }
}

/// The Flex tensor behind a float tensor, contiguous.
pub(super) fn raw<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    let t = t.into_primitive().tensor();
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

pub(super) fn wrap<const D: usize>(t: FlexTensor) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// A tensor's values from its first element (contiguous tensors).
pub(super) fn values<E: Element + bytemuck::Pod>(t: &FlexTensor) -> &[E] {
    &t.storage::<E>()[t.layout().start_offset()..]
}

fn all_f32(dtypes: &[DType]) -> bool {
    dtypes.iter().all(|d| *d == DType::F32)
}

/// Whether the row kernels take tensors of `dtype`: f32, or a half type they widen to f32
/// (weights packed once, activations per call) and compute in f32.
pub(super) fn is_row_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// The first `len` values of a contiguous f32, bf16 or f16 tensor, as f32 (exact).
pub(super) fn to_f32(t: &FlexTensor, len: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    widen_into(t, 0, len, &mut out);
    out
}

/// Appends the values `start..start + len` of a contiguous f32, bf16 or f16 tensor to `out`,
/// as f32 (exact).
fn widen_into(t: &FlexTensor, start: usize, len: usize, out: &mut Vec<f32>) {
    let range = start..start + len;
    match t.dtype() {
        DType::F32 => out.extend_from_slice(&values::<f32>(t)[range]),
        DType::BF16 => out.extend(values::<bf16>(t)[range].iter().map(|v| v.to_f32())),
        DType::F16 => out.extend(values::<f16>(t)[range].iter().map(|v| v.to_f32())),
        other => unreachable!("row dtypes are checked by the caller, not {other:?}"),
    }
}

/// `values` `[shape]` in `dtype` (rounded to nearest from f32).
pub(super) fn from_f32(values: &[f32], shape: Vec<usize>, dtype: DType) -> FlexTensor {
    match dtype {
        DType::F32 => from_f32_vec(values.to_vec(), shape, dtype),
        _ => half_from_f32(values, shape, dtype),
    }
}

/// [`from_f32`] taking the vector: an f32 result is the vector itself (no copy).
pub(super) fn from_f32_vec(values: Vec<f32>, shape: Vec<usize>, dtype: DType) -> FlexTensor {
    match dtype {
        DType::F32 => FlexTensor::from_data(TensorData::new(values, shape)),
        _ => half_from_f32(&values, shape, dtype),
    }
}

fn half_from_f32(values: &[f32], shape: Vec<usize>, dtype: DType) -> FlexTensor {
    let data = match dtype {
        DType::BF16 => TensorData::new(values.iter().map(|v| bf16::from_f32(*v)).collect(), shape),
        DType::F16 => TensorData::new(values.iter().map(|v| f16::from_f32(*v)).collect(), shape),
        other => unreachable!("row dtypes are checked by the caller, not {other:?}"),
    };
    FlexTensor::from_data(data)
}

/// The row kernel's `x · W` (the first `cols` outputs) for at most [`MAX_ROWS`] rows in f32
/// (any number when the packed copy is the weight's only one), or in bf16/f16 (widened to f32,
/// computed in f32, rounded back: the weights' values and f32 accumulation); `None` otherwise.
fn try_rows(
    x: &Tensor<Flex, 3>,
    w: &Tensor<Flex, 2>,
    layout: Layout,
    packed: &Packed,
    cols: usize,
) -> Option<Tensor<Flex, 3>> {
    let [b, s, k] = x.dims();
    let [w0, w1] = w.dims();
    let dtype = x.dtype();
    if w.dtype() != dtype || !is_row_dtype(dtype) {
        return None;
    }
    let n = if layout == Layout::InOut { w1 } else { w0 };
    let source = w.clone().into_primitive().tensor();
    // Half-precision products of any length take the row kernels: Flex's own half-precision
    // matmul is several times slower than widening to f32. Longer f32 products take Burn's
    // matmul, unless the packed copy is the only one.
    if b * s > MAX_ROWS && dtype == DType::F32 && !packed.flex.is_sole(&source) {
        return None;
    }
    let entry = packed.flex.of(source, layout, k, n, None);
    let x = raw(x.clone());
    let rows = b * s;
    if dtype == DType::F32 {
        let mut out = FlexTensor::empty(Shape::from(vec![b, s, cols]), DType::F32);
        let xs = &values::<f32>(&x)[..rows * k];
        cpu::rows::x_panels(xs, &entry.panels, out.storage_mut::<f32>(), rows, cols);
        return Some(wrap(out));
    }
    let mut out = vec![0.0f32; rows * cols];
    cpu::rows::x_panels(&to_f32(&x, rows * k), &entry.panels, &mut out, rows, cols);
    Some(wrap(from_f32(&out, vec![b, s, cols], dtype)))
}

impl LayerSkipBackend for Flex {
    fn product(
        x: Tensor<Self, 3>,
        w: Tensor<Self, 2>,
        packed: &Packed,
        cols: usize,
    ) -> Tensor<Self, 3> {
        match try_rows(&x, &w, Layout::InOut, packed, cols) {
            Some(out) => out,
            None => super::burn_ops::product(x, w, cols),
        }
    }

    fn tied_product(
        x: Tensor<Self, 3>,
        embed: Tensor<Self, 2>,
        packed: &Packed,
        vocab: usize,
    ) -> Tensor<Self, 3> {
        match try_rows(&x, &embed, Layout::OutIn, packed, vocab) {
            Some(out) => out,
            None => super::burn_ops::tied_product(x, embed, vocab),
        }
    }

    fn prepare(
        weight: Tensor<Self, 2>,
        layout: Layout,
        quantize: Option<Quantization>,
        packed: &Packed,
    ) -> Result<(), ModelError> {
        if !is_row_dtype(weight.dtype()) {
            return match quantize {
                None => Ok(()),
                Some(q) => Err(ModelError::Unsupported(format!(
                    "{q} needs f32, bf16 or f16 weights, not {:?}",
                    weight.dtype()
                ))),
            };
        }
        let [a, b] = weight.dims();
        let (k, n) = match layout {
            Layout::InOut => (a, b),
            Layout::OutIn => (b, a),
        };
        packed
            .flex
            .of(weight.into_primitive().tensor(), layout, k, n, quantize);
        Ok(())
    }

    fn release(weight: Tensor<Self, 2>, packed: &Packed) -> Option<Tensor<Self, 2>> {
        // One value broadcast to the weight's shape (stride 0): the dims products read, no
        // storage.
        let stand_in = Tensor::<Self, 2>::zeros([1, 1], &weight.device())
            .cast(weight.dtype())
            .expand(weight.dims());
        let raw_stand_in = stand_in.clone().into_primitive().tensor();
        packed
            .flex
            .release(&weight.into_primitive().tensor(), raw_stand_in)
            .then_some(stand_in)
    }

    fn embed_rows(
        weight: Tensor<Self, 2>,
        head: Option<&Packed>,
        tokens: Tensor<Self, 2, Int>,
    ) -> Tensor<Self, 3> {
        let source = || weight.clone().into_primitive().tensor();
        let Some(entry) = head.and_then(|h| h.flex.sole_entry(&source())) else {
            return burn::tensor::module::embedding(weight, tokens);
        };
        // The embedding's only copy is the tied head's panels: row `t` is output `t`.
        let [b, s] = tokens.dims();
        let (hidden, vocab) = entry.panels.dims();
        let ids = tokens.into_data().convert::<i64>();
        let mut out = vec![0.0f32; b * s * hidden];
        for (row, id) in out.chunks_mut(hidden).zip(ids.iter::<i64>()) {
            let id = usize::try_from(id).ok().filter(|&t| t < vocab);
            let id = id.unwrap_or_else(|| panic!("token id out of the vocabulary of {vocab}"));
            entry.panels.column(id, row);
        }
        wrap(from_f32_vec(out, vec![b, s, hidden], weight.dtype()))
    }

    fn rms_norm(norm: &RmsNorm<Self>, x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        norm.forward(x)
    }

    const FUSED_BACKWARD: bool = true;

    fn prepared_rows_limit() -> Option<usize> {
        Some(MAX_ROWS)
    }

    /// Every CPU: AVX512-BF16's products where it has them, else the f32 GEMM on the rounded
    /// operands (see [`cpu::linear::Operands::Bf16`]).
    fn bf16_products() -> bool {
        true
    }

    fn linear_forward(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        bf16: bool,
    ) -> Option<Tensor<Self, 2>> {
        super::flex_train::linear_forward(x, w, bf16)
    }

    fn linear_backward(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        dy: Tensor<Self, 2>,
        bf16: bool,
    ) -> [Tensor<Self, 2>; 2] {
        super::flex_train::linear_backward(x, w, dy, bf16)
    }

    fn rms_norm_backward(
        norm: &RmsNorm<Self>,
        x: Tensor<Self, 3>,
        dy: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 1>) {
        super::flex_train::rms_norm_backward(norm, x, dy)
    }

    fn silu_mul_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        dy: Tensor<Self, 3>,
    ) -> [Tensor<Self, 3>; 2] {
        super::flex_train::silu_mul_backward(gate, up, dy)
    }

    fn rope_backward(dy: Tensor<Self, 4>, tables: &RopeTables<Self>) -> Tensor<Self, 4> {
        super::flex_train::rope_backward(dy, tables)
    }

    fn self_attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Option<SelfAttention<Self>> {
        super::flex_train::self_attention_forward(q, k, v)
    }

    fn self_attention_backward(
        qkv: [Tensor<Self, 4>; 3],
        forward: SelfAttention<Self>,
        dout: Tensor<Self, 3>,
    ) -> [Tensor<Self, 4>; 3] {
        super::flex_train::self_attention_backward(qkv, forward, dout)
    }

    fn head_cross_entropy(
        x: Tensor<Self, 2>,
        head: &Head<Self>,
        bf16: bool,
        targets: Tensor<Self, 1, Int>,
        weights: Tensor<Self, 1>,
        grads: bool,
    ) -> Option<HeadLoss<Self>> {
        super::flex_train::head_cross_entropy(x, head, bf16, targets, weights, grads)
    }

    fn silu_mul(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let dtype = gate.dtype();
        if up.dtype() != dtype || !is_row_dtype(dtype) || gate.dims() != up.dims() {
            return super::burn_ops::silu_mul(gate, up);
        }
        let dims = gate.dims().to_vec();
        let (g, u) = (raw(gate), raw(up));
        let n = g.layout().shape().num_elements();
        if dtype == DType::F32 {
            let mut out = FlexTensor::empty(g.layout().shape().clone(), DType::F32);
            cpu::silu_mul(
                &values(&g)[..n],
                &values(&u)[..n],
                &mut out.storage_mut::<f32>()[..n],
            );
            return wrap(out);
        }
        let mut out = vec![0.0; n];
        cpu::silu_mul(&to_f32(&g, n), &to_f32(&u, n), &mut out);
        wrap(from_f32(&out, dims, dtype))
    }

    fn rope(x: Tensor<Self, 4>, tables: &RopeTables<Self>) -> Tensor<Self, 4> {
        let dtype = x.dtype();
        let same = [tables.cos.dtype(), tables.sin.dtype()]
            .iter()
            .all(|d| *d == dtype);
        if !same || !is_row_dtype(dtype) {
            return super::burn_ops::rope(x, tables);
        }
        let dims = x.dims();
        let (x, cos, sin) = (raw(x), raw(tables.cos.clone()), raw(tables.sin.clone()));
        if dtype == DType::F32 {
            let mut out = FlexTensor::empty(Shape::from(dims.to_vec()), DType::F32);
            cpu::rope(
                values(&x),
                values(&cos),
                values(&sin),
                out.storage_mut::<f32>(),
                dims,
            );
            return wrap(out);
        }
        let (n, table) = (dims.iter().product(), dims[1] * dims[3]);
        let mut out = vec![0.0; n];
        let (cos, sin) = (to_f32(&cos, table), to_f32(&sin, table));
        cpu::rope(&to_f32(&x, n), &cos, &sin, &mut out, dims);
        wrap(from_f32(&out, dims.to_vec(), dtype))
    }

    fn write_at<const D: usize>(
        buffer: Tensor<Self, D>,
        dim: usize,
        at: usize,
        new: Tensor<Self, D>,
    ) -> Tensor<Self, D> {
        if buffer.dtype() != new.dtype() || !is_cache_dtype(buffer.dtype()) {
            return super::burn_ops::write_at(buffer, dim, at, new);
        }
        let (dims, added) = (buffer.dims(), new.dims()[dim]);
        let inner: usize = dims[dim + 1..].iter().product();
        let outer: usize = dims[..dim].iter().product();
        let mut dst = writable(buffer);
        let src = raw(new);
        let dst_at = |o: usize| o * dims[dim] * inner + at * inner;
        copy_float_blocks(&mut dst, &src, (outer, added * inner), dst_at);
        wrap(dst)
    }

    fn store_kv(
        [key_cache, value_cache]: [Tensor<Self, 4>; 2],
        at: usize,
        keys: Tensor<Self, 4>,
        values: Tensor<Self, 4>,
        tables: &RopeTables<Self>,
    ) -> [Tensor<Self, 4>; 2] {
        let dtype = key_cache.dtype();
        let same = [value_cache.dtype(), keys.dtype(), values.dtype()]
            .iter()
            .all(|d| *d == dtype);
        if !same || !is_cache_dtype(dtype) {
            return super::burn_ops::store_kv([key_cache, value_cache], at, keys, values, tables);
        }
        let keys = Self::rope(keys, tables);
        [
            write_seq_major(key_cache, at, keys),
            write_seq_major(value_cache, at, values),
        ]
    }

    fn attend_cached(
        q: Tensor<Self, 4>,
        tables: &RopeTables<Self>,
        [key_cache, value_cache]: [&Tensor<Self, 4>; 2],
        len: usize,
        groups: usize,
    ) -> Tensor<Self, 3> {
        let q = Self::rope(q, tables);
        let [batch, seq, heads, d] = q.dims();
        let [_, kv_heads, capacity, _] = key_cache.dims();
        let dtypes = [q.dtype(), key_cache.dtype(), value_cache.dtype()];
        if seq <= MAX_ROWS && all_f32(&dtypes) {
            let (q, k, v) = (raw(q), raw(key_cache.clone()), raw(value_cache.clone()));
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
            cpu::attend::attend(
                values(&q),
                values(&k),
                values(&v),
                out.storage_mut::<f32>(),
                &shape,
            );
            return wrap(out);
        }
        if seq <= MAX_ROWS && dtypes.iter().all(|&t| t == dtypes[0] && is_row_dtype(t)) {
            // Half precision: the queries and the held prefix of the cache widened to f32,
            // the f32 kernel, the output rounded back.
            let dtype = dtypes[0];
            let (q, k, v) = (raw(q), raw(key_cache.clone()), raw(value_cache.clone()));
            let shape = AttendShape {
                batch,
                seq,
                heads,
                kv_heads,
                capacity: len,
                d,
                len,
                groups,
            };
            let prefix = |t: &FlexTensor| {
                let mut out = Vec::with_capacity(batch * kv_heads * len * d);
                for block in 0..batch * kv_heads {
                    widen_into(t, block * capacity * d, len * d, &mut out);
                }
                out
            };
            let mut out = vec![0.0; batch * seq * heads * d];
            let q = to_f32(&q, batch * seq * heads * d);
            cpu::attend::attend(&q, &prefix(&k), &prefix(&v), &mut out, &shape);
            return wrap(from_f32(&out, vec![batch, seq, heads * d], dtype));
        }
        if dtypes.iter().all(|&t| t == dtypes[0] && is_cache_dtype(t)) {
            let keys = gather_heads(key_cache, len, groups);
            let values = gather_heads(value_cache, len, groups);
            return causal_attention(q, keys, values);
        }
        super::burn_ops::attend_cached(q, [key_cache, value_cache], len, groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{FloatDType, TensorData};

    /// The block-copy gather equals the held prefix with each kv head repeated (what Burn's
    /// attention reads), in f32 and the half dtypes.
    #[test]
    fn gather_heads_repeats_each_kv_head_over_the_held_prefix() {
        let shape = [2, 3, 8, 4];
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let buffer =
            Tensor::<Flex, 4>::from_data(TensorData::new(data, shape), &Default::default());
        for dtype in [None, Some(FloatDType::F16), Some(FloatDType::BF16)] {
            let buffer = dtype.map_or(buffer.clone(), |d| buffer.clone().cast(d));
            let got = gather_heads(&buffer, 5, 2);
            let want = super::super::repeat_kv(buffer.slice_dim(2, 0..5), 2);
            assert_eq!(got.dims(), [2, 6, 5, 4]);
            assert_eq!(
                got.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
                want.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
                "{dtype:?}"
            );
        }
    }
}
