//! The one seam between the backend-generic model and backend-specific fast paths.
//!
//! [`LayerSkipBackend`] is Burn's backend-extension pattern: a trait over [`Backend`] whose
//! default methods compose Burn ops, so every backend runs the model, and whose implementations
//! for particular backends run hand-written kernels instead (the slice kernels of
//! `layerskip-kernels::cpu` on Flex, its CubeCL kernels on the CubeCL backends: CUDA, wgpu).
//! Model code calls `B::op(..)` and never asks which backend it runs on.
//!
//! | backend | implementation |
//! |---|---|
//! | Flex (CPU) | [`flex`]: packed row kernels on both cores (f32, or half precision widened to f32), attention in place over the cache, in-place cache writes |
//! | CubeCL: CUDA, wgpu, Vulkan, Metal | `cube` (feature `cube`): one CubeCL launch per op, fixed launch shapes while decoding |
//! | `Autodiff<B>` (training) | the defaults (Burn ops, so gradients flow) |
//!
//! A fast path must compute each row of a few-row call exactly as it computes that row alone
//! (self-speculative verification then reproduces autoregressive decoding bit for bit).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::nn::RmsNorm;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use crate::error::ModelError;
use crate::rope::RopeTables;

#[cfg(feature = "cube")]
pub mod cube;
#[cfg(feature = "flex")]
pub mod flex;

/// Backend state kept beside one weight matrix (on Flex, the packed copy its row kernels read),
/// made by [`LayerSkipBackend::prepare`] or on first use, and shared by clones of the module that
/// holds it.
///
/// A concrete type rather than an associated type of [`LayerSkipBackend`]: `#[derive(Module)]`
/// hands skipped fields unchanged between a backend's module and its `Autodiff` wrapper's, so
/// the field's type cannot depend on the backend. Each backend's state is its own field.
#[derive(Clone, Default)]
pub struct Packed {
    #[cfg(feature = "flex")]
    pub(crate) flex: flex::PackedSlot,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(feature = "flex")]
        let packed = self.flex.is_packed();
        #[cfg(not(feature = "flex"))]
        let packed = false;
        f.debug_struct("Packed").field("packed", &packed).finish()
    }
}

/// The ops of the LayerSkip decoder that backends may run with their own kernels. Every method
/// defaults to Burn's ops ([`burn_ops`]).
pub trait LayerSkipBackend: Backend {
    /// `x · W[:, ..cols]` for a bias-free linear layer's weight `W` `[in, out]` (`packed`: the
    /// backend's state for `W`).
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, in]` -> `[batch, seq, cols]`
    fn product(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        packed: &Packed,
        cols: usize,
    ) -> Tensor<Self, 3> {
        let _ = packed;
        burn_ops::product(x, weight, cols)
    }

    /// `x · Eᵀ` over the first `vocab` rows of an embedding `E` `[vocab_size, hidden]` used as a
    /// tied LM head.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` -> `[batch, seq, vocab]`
    fn tied_product(
        x: Tensor<Self, 3>,
        embed: Tensor<Self, 2>,
        packed: &Packed,
        vocab: usize,
    ) -> Tensor<Self, 3> {
        let _ = packed;
        burn_ops::tied_product(x, embed, vocab)
    }

    /// Makes the backend's state for a weight now rather than on its first product (on Flex,
    /// the packed copy the row kernels read), so that the first token of a generation does not
    /// pay for it; with `quantize`, that state holds the weight in the quantized format, which
    /// later products then compute with. Backends without such state do nothing, and refuse
    /// `quantize`.
    fn prepare(
        weight: Tensor<Self, 2>,
        layout: WeightLayout,
        quantize: Option<Quantization>,
        packed: &Packed,
    ) -> Result<(), ModelError> {
        let _ = (weight, layout, packed);
        match quantize {
            None => Ok(()),
            Some(q) => Err(ModelError::Unsupported(format!(
                "{q} weights have kernels on the CPU only (--device cpu)"
            ))),
        }
    }

    /// RMSNorm of the last dimension.
    fn rms_norm(norm: &RmsNorm<Self>, x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        norm.forward(x)
    }

    /// SwiGLU's product `silu(gate) * up`.
    fn silu_mul(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        burn_ops::silu_mul(gate, up)
    }

    /// Rotary embedding of `x` in the projections' layout: `x * cos + rotate_half(x) * sin`.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, heads, head_dim]`; `tables` cover the `seq` positions
    fn rope(x: Tensor<Self, 4>, tables: &RopeTables<Self>) -> Tensor<Self, 4> {
        burn_ops::rope(x, tables)
    }

    /// Writes `new` into `buffer` at `at..at + new.dims()[dim]` along `dim` (every other
    /// dimension whole) and returns the buffer, in place where the backend can.
    fn write_at<const D: usize>(
        buffer: Tensor<Self, D>,
        dim: usize,
        at: usize,
        new: Tensor<Self, D>,
    ) -> Tensor<Self, D> {
        burn_ops::write_at(buffer, dim, at, new)
    }

    /// Rotates the new keys and writes them and the new values into the cache buffers at
    /// positions `at..at + seq`; returns the buffers.
    ///
    /// # Shapes
    /// - `caches`: keys and values `[batch, kv_heads, capacity, head_dim]`
    /// - `keys`, `values`: `[batch, seq, kv_heads, head_dim]` (the projections' layout; keys not
    ///   yet rotated)
    fn store_kv(
        caches: [Tensor<Self, 4>; 2],
        at: usize,
        keys: Tensor<Self, 4>,
        values: Tensor<Self, 4>,
        tables: &RopeTables<Self>,
    ) -> [Tensor<Self, 4>; 2] {
        burn_ops::store_kv(caches, at, keys, values, tables)
    }

    /// Causal grouped-query attention of the `seq` newest positions over the first `len`
    /// positions of the cache buffers (the new ones written last): the queries rotated with
    /// `tables`, query head `h` reading kv head `h / groups`.
    ///
    /// # Shapes
    /// - `q`: `[batch, seq, heads, head_dim]` (not yet rotated)
    /// - `caches`: keys and values `[batch, kv_heads, capacity, head_dim]`
    /// - returns `[batch, seq, heads * head_dim]`
    fn attend_cached(
        q: Tensor<Self, 4>,
        tables: &RopeTables<Self>,
        caches: [&Tensor<Self, 4>; 2],
        len: usize,
        groups: usize,
    ) -> Tensor<Self, 3> {
        burn_ops::attend_cached(Self::rope(q, tables), caches, len, groups)
    }

    /// Attention's inputs: `norm(x)` times the q, k and v weights.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; weights `[hidden, n_i]` -> `[batch, seq, n_i]` each
    fn attention_inputs(
        x: Tensor<Self, 3>,
        norm: &RmsNorm<Self>,
        weights: [Tensor<Self, 2>; 3],
        packed: [&Packed; 3],
    ) -> [Tensor<Self, 3>; 3] {
        burn_ops::attention_inputs(x, norm, weights, packed)
    }

    /// `residual + x · W`: an output projection and the residual connection around it.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, in]`; `weight` `[in, out]`; `residual` `[batch, seq, out]`
    fn product_add(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        packed: &Packed,
        residual: Tensor<Self, 3>,
    ) -> Tensor<Self, 3> {
        let n = weight.dims()[1];
        residual + Self::product(x, weight, packed, n)
    }

    /// SwiGLU's hidden activations `silu(norm(x) · G) * (norm(x) · U)`.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; `gate`, `up` `[hidden, inter]` -> `[batch, seq, inter]`
    fn swiglu(
        x: Tensor<Self, 3>,
        norm: &RmsNorm<Self>,
        [gate, up]: [Tensor<Self, 2>; 2],
        [gate_packed, up_packed]: [&Packed; 2],
    ) -> Tensor<Self, 3> {
        burn_ops::swiglu(x, norm, [gate, up], [gate_packed, up_packed])
    }

    /// The shared exit head's first `vocab` logits: the final norm, then the LM head.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` -> `[batch, seq, vocab]`
    fn exit_logits(
        x: Tensor<Self, 3>,
        norm: &RmsNorm<Self>,
        head: Head<Self>,
        packed: &Packed,
        vocab: usize,
    ) -> Tensor<Self, 3> {
        burn_ops::exit_logits(x, norm, head, packed, vocab)
    }
}

pub use layerskip_kernels::cpu::rows::Quantization;

/// How a weight matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`, Burn's `Linear` layout.
    InOut,
    /// `[out, in]`, an embedding read as a tied head.
    OutIn,
}

/// The LM head's weight as stored.
#[derive(Debug, Clone)]
pub enum Head<B: Backend> {
    /// The token embedding `[vocab, hidden]`, read as a tied head.
    Tied(Tensor<B, 2>),
    /// An untied head `[hidden, vocab]`.
    Untied(Tensor<B, 2>),
}

/// The defaults of [`LayerSkipBackend`], in Burn's ops: what every backend can run and what the
/// fast paths fall back to for inputs their kernels do not take.
pub mod burn_ops {
    use super::*;

    /// See [`LayerSkipBackend::product`].
    pub fn product<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 2>, cols: usize) -> Tensor<B, 3> {
        let [k, n] = weight.dims();
        let weight = if cols == n {
            weight
        } else {
            weight.slice([0..k, 0..cols])
        };
        x.matmul(weight.unsqueeze())
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
}

/// `[b, kv_heads, t, d]` -> `[b, kv_heads * groups, t, d]`, head `h` reading kv head
/// `h / groups`.
pub(crate) fn repeat_kv<B: Backend>(x: Tensor<B, 4>, groups: usize) -> Tensor<B, 4> {
    if groups == 1 {
        return x;
    }
    let heads = x.dims()[1] * groups;
    let index: Vec<i64> = (0..heads).map(|h| (h / groups) as i64).collect();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [heads]), &x.device());
    x.select(1, index)
}

/// Burn's attention of `q` `[batch, seq, heads, head_dim]` over keys and values `[batch, heads,
/// total, head_dim]` with the causal mask aligned bottom-right (the new positions see every
/// earlier one): returns `[batch, seq, heads * head_dim]`.
pub(crate) fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
) -> Tensor<B, 3> {
    let [b, s, heads, d] = q.dims();
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    attention(q.swap_dims(1, 2), keys, values, None, None, options)
        .swap_dims(1, 2)
        .reshape([b, s, heads * d])
}

/// Training differentiates through Burn's ops: the defaults throughout.
impl<B: LayerSkipBackend, C: CheckpointStrategy> LayerSkipBackend for Autodiff<B, C> {}
