//! Block copies on Flex tensors for the KV cache: writes in place into the preallocated
//! buffers (Burn 0.21's Flex `slice_assign` copies the whole destination on every call) and the
//! kv heads gathered for Burn's attention.

use burn::backend::Flex;
use burn::tensor::{DType, Element, Shape, Tensor};
use burn_flex::FlexTensor;
use half::{bf16, f16};

use super::{raw, values, wrap};

/// Copies `outer` blocks of `block` elements of `src` into `dst`, block `o` at `dst_at(o)`.
pub(super) fn copy_blocks<E: Element + bytemuck::Pod>(
    dst: &mut FlexTensor,
    src: &FlexTensor,
    (outer, block): (usize, usize),
    dst_at: impl Fn(usize) -> usize,
) {
    let src: &[E] = values(src);
    // The destination is a cache buffer its cache holds alone, so `storage_mut` does not copy.
    let dst: &mut [E] = dst.storage_mut::<E>();
    for o in 0..outer {
        let d = dst_at(o);
        dst[d..d + block].copy_from_slice(&src[o * block..(o + 1) * block]);
    }
}

/// [`copy_blocks`] for a float dtype the cache holds; false for any other.
pub(super) fn copy_float_blocks(
    dst: &mut FlexTensor,
    src: &FlexTensor,
    shape: (usize, usize),
    dst_at: impl Fn(usize) -> usize,
) -> bool {
    match dst.dtype() {
        DType::F32 => copy_blocks::<f32>(dst, src, shape, dst_at),
        DType::F16 => copy_blocks::<f16>(dst, src, shape, dst_at),
        DType::BF16 => copy_blocks::<bf16>(dst, src, shape, dst_at),
        _ => return false,
    }
    true
}

/// A buffer ready to be written in place (contiguous from offset 0).
pub(super) fn writable<const D: usize>(buffer: Tensor<Flex, D>) -> FlexTensor {
    let t = buffer.into_primitive().tensor();
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    }
}

pub(super) fn is_cache_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Writes `new` `[batch, seq, kv_heads, head_dim]` into `buffer` `[batch, kv_heads, capacity,
/// head_dim]` at positions `at..at + seq`, one block copy per (position, head).
pub(super) fn write_seq_major(
    buffer: Tensor<Flex, 4>,
    at: usize,
    new: Tensor<Flex, 4>,
) -> Tensor<Flex, 4> {
    let [batch, kv_heads, capacity, d] = buffer.dims();
    let seq = new.dims()[1];
    let mut dst = writable(buffer);
    let src = raw(new);
    let dst_at = |o: usize| {
        let (g, t, b) = (o % kv_heads, o / kv_heads % seq, o / (kv_heads * seq));
        ((b * kv_heads + g) * capacity + at + t) * d
    };
    let copied = copy_float_blocks(&mut dst, &src, (batch * seq * kv_heads, d), dst_at);
    assert!(copied, "cache dtypes are checked by the caller");
    wrap(dst)
}

/// `buffer[:, h / groups, 0..len, :]` for every head `h < kv_heads * groups`, contiguous
/// `[batch, kv_heads * groups, len, head_dim]`: one block copy per head (Flex copies a strided
/// view element by element).
pub(super) fn gather_heads(buffer: &Tensor<Flex, 4>, len: usize, groups: usize) -> Tensor<Flex, 4> {
    let [batch, kv_heads, capacity, d] = buffer.dims();
    let src = raw(buffer.clone());
    let heads = kv_heads * groups;
    let mut out = FlexTensor::empty(Shape::from(vec![batch, heads, len, d]), src.dtype());
    // Block `o` of the output is head `o % heads` of sequence `o / heads`.
    let shape = (batch * heads, len * d);
    let src_at = |o: usize| (o / heads * kv_heads + o % heads / groups) * capacity * d;
    fn gather<E: Element + bytemuck::Pod>(
        src: &FlexTensor,
        out: &mut FlexTensor,
        (outer, block): (usize, usize),
        src_at: impl Fn(usize) -> usize,
    ) {
        let src: &[E] = values(src);
        let out: &mut [E] = out.storage_mut::<E>();
        for o in 0..outer {
            let s = src_at(o);
            out[o * block..(o + 1) * block].copy_from_slice(&src[s..s + block]);
        }
    }
    match src.dtype() {
        DType::F32 => gather::<f32>(&src, &mut out, shape, src_at),
        DType::F16 => gather::<f16>(&src, &mut out, shape, src_at),
        DType::BF16 => gather::<bf16>(&src, &mut out, shape, src_at),
        other => unreachable!("cache dtypes are checked by the caller, not {other:?}"),
    }
    wrap(out)
}
