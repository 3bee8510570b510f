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
