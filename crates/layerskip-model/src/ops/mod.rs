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
//! | Flex (CPU) | `flex`: packed row kernels on both cores (f32, or half precision widened to f32), attention in place over the cache, in-place cache writes |
//! | CubeCL: CUDA, wgpu, Vulkan, Metal | `cube` (feature `cube`): one CubeCL launch per op, fixed launch shapes while decoding |
//! | `Autodiff<B>` (training) | Burn's ops, so gradients flow, except the fused training kernels `B` has (`autodiff`, on Flex: the exit head's cross-entropy with its gradients, causal attention, RMSNorm, SwiGLU, RoPE, and under bf16 products the linear layers' products), each one backward step |
//!
//! A fast path must compute each row of a few-row call exactly as it computes that row alone
//! (self-speculative verification then reproduces autoregressive decoding bit for bit).

use burn::nn::RmsNorm;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use crate::error::ModelError;
use crate::rope::RopeTables;

mod autodiff;
#[cfg(feature = "cube")]
pub(crate) mod cube;
#[cfg(feature = "cube")]
pub use cube::set_kernels_enabled;
#[cfg(feature = "flex")]
pub(crate) mod flex;
#[cfg(feature = "flex")]
mod flex_train;

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
    /// Whether `Autodiff<B>`'s products with this weight round their operands to bf16 (see
    /// [`LayerSkipBackend::bf16_products`]).
    pub(crate) bf16_products: bool,
}

impl Packed {
    /// A state of its own with the same settings and nothing prepared: a module that frees
    /// its loaded weights ([`LayerSkipBackend::release`]) must not share its state with clones
    /// that keep theirs (a clone's product would repack the shared state from its weight).
    pub(crate) fn detached(&self) -> Packed {
        Packed {
            #[cfg(feature = "flex")]
            flex: Default::default(),
            bf16_products: self.bf16_products,
        }
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(feature = "flex")]
        let packed = self.flex.is_packed();
        #[cfg(not(feature = "flex"))]
        let packed = false;
        f.debug_struct("Packed")
            .field("packed", &packed)
            .field("bf16_products", &self.bf16_products)
            .finish()
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

    /// After [`prepare`](Self::prepare), a stand-in for `weight` that holds none of its values,
    /// where the backend's state for it computes every product with it, of any row count (on
    /// Flex, the packed copy): the module keeps the stand-in and the loaded weight's memory is
    /// freed ([`LlamaModel::into_decoding_only`](crate::LlamaModel::into_decoding_only)).
    /// `None` (the default, and where `weight` is not the prepared one): the weight stays.
    fn release(weight: Tensor<Self, 2>, packed: &Packed) -> Option<Tensor<Self, 2>> {
        let _ = (weight, packed);
        None
    }

    /// The most rows of a product that compute from the state [`prepare`](Self::prepare) made
    /// (on Flex, the packed and possibly quantized copy); longer products compute with the
    /// loaded weights through Burn's ops, so a quantized model is only itself up to this many
    /// positions per pass. `None` (the default): no such limit.
    fn prepared_rows_limit() -> Option<usize> {
        None
    }

    /// The rows of an embedding `weight` `[vocab, hidden]` for `tokens`; `head` is the state of
    /// the tied head read from it, if it is tied (after [`release`](Self::release), the
    /// embedding's only copy: rows are read from it, in its format).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` -> `[batch, seq, hidden]`
    fn embed_rows(
        weight: Tensor<Self, 2>,
        head: Option<&Packed>,
        tokens: Tensor<Self, 2, Int>,
    ) -> Tensor<Self, 3> {
        let _ = head;
        burn::tensor::module::embedding(weight, tokens)
    }

    /// RMSNorm of the last dimension.
    fn rms_norm(norm: &RmsNorm<Self>, x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        norm.forward(x)
    }

    /// SwiGLU's product `silu(gate) * up`.
    fn silu_mul(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        burn_ops::silu_mul(gate, up)
    }

    /// Whether this backend, here, has the products of mixed-precision training without a bf16
    /// copy of the model: [`linear_forward`](Self::linear_forward) with `bf16` operands (rounded
    /// as the product reads them, f32 accumulation) while activations, weights and gradients stay
    /// f32. Where it does not, mixed precision casts the model to bf16 instead.
    fn bf16_products() -> bool {
        false
    }

    /// A linear layer's product for training, `x · W`, by a kernel whose backward is
    /// [`linear_backward`](Self::linear_backward); with `bf16`, its operands are rounded to bf16
    /// and accumulated in f32 (where [`bf16_products`](Self::bf16_products)). `None` where the
    /// backend has no such kernel for these inputs (the default): `Autodiff<Self>` then
    /// differentiates Burn's matmul.
    ///
    /// # Shapes
    /// - `x`: `[rows, in]`; `w`: `[in, out]` -> `[rows, out]`
    fn linear_forward(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        bf16: bool,
    ) -> Option<Tensor<Self, 2>> {
        let _ = (x, w, bf16);
        None
    }

    /// The gradients `[dx, dW] = [dy · Wᵀ, xᵀ · dy]` of
    /// [`linear_forward`](Self::linear_forward), in its precision.
    fn linear_backward(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        dy: Tensor<Self, 2>,
        bf16: bool,
    ) -> [Tensor<Self, 2>; 2] {
        let _ = bf16;
        [dy.clone().matmul(w.transpose()), x.transpose().matmul(dy)]
    }

    /// Whether `Autodiff<Self>` differentiates [`rms_norm`](Self::rms_norm),
    /// [`silu_mul`](Self::silu_mul) and [`rope`](Self::rope) as one graph step each, the
    /// backend's forward with [`rms_norm_backward`](Self::rms_norm_backward),
    /// [`silu_mul_backward`](Self::silu_mul_backward) and [`rope_backward`](Self::rope_backward)
    /// (backends with kernels for them), rather than through the Burn ops of the defaults.
    const FUSED_BACKWARD: bool = false;

    /// The gradients of [`rms_norm`](Self::rms_norm) with respect to `x` and the norm's gain,
    /// given the gradient `dy` of its output.
    ///
    /// # Shapes
    /// - `x`, `dy`: `[batch, seq, hidden]` -> `[batch, seq, hidden]` and `[hidden]`
    fn rms_norm_backward(
        norm: &RmsNorm<Self>,
        x: Tensor<Self, 3>,
        dy: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 1>) {
        burn_ops::rms_norm_backward(norm, x, dy)
    }

    /// The gradients of [`silu_mul`](Self::silu_mul) with respect to `gate` and `up`, given the
    /// gradient `dy` of its output.
    fn silu_mul_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        dy: Tensor<Self, 3>,
    ) -> [Tensor<Self, 3>; 2] {
        burn_ops::silu_mul_backward(gate, up, dy)
    }

    /// The gradient of [`rope`](Self::rope) with respect to `x`, given the gradient `dy` of its
    /// output (the transposed rotation).
    fn rope_backward(dy: Tensor<Self, 4>, tables: &RopeTables<Self>) -> Tensor<Self, 4> {
        burn_ops::rope_backward(dy, tables)
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

    /// [`attention_inputs`](Self::attention_inputs) with the keys and values stored: the
    /// queries returned, the keys and values written into the cache buffers at `at..at + seq` as
    /// [`store_kv`](Self::store_kv) writes them (one launch on the CubeCL backends).
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; weights `[hidden, n_i]`; `tables` cover the `seq` positions
    /// - `caches`: keys and values `[batch, kv_heads, capacity, head_dim]`, `n_1 = n_2 =
    ///   kv_heads * head_dim`
    /// - returns the queries `[batch, seq, n_0]` and the buffers
    fn attention_inputs_stored(
        x: Tensor<Self, 3>,
        norm: &RmsNorm<Self>,
        (weights, packed): ([Tensor<Self, 2>; 3], [&Packed; 3]),
        (caches, at, tables): ([Tensor<Self, 4>; 2], usize, &RopeTables<Self>),
    ) -> (Tensor<Self, 3>, [Tensor<Self, 4>; 2]) {
        burn_ops::attention_inputs_stored(x, norm, (weights, packed), (caches, at, tables))
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

    /// Causal grouped-query self-attention over whole sequences (no cache: training and
    /// evaluation), query head `h` reading kv head `h / (heads / kv_heads)`.
    ///
    /// # Shapes
    /// - `q`: `[batch, seq, heads, head_dim]`; `k`, `v`: `[batch, seq, kv_heads, head_dim]`
    ///   (`q` and `k` rotated) -> `[batch, seq, heads * head_dim]`
    fn self_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Tensor<Self, 3> {
        match Self::self_attention_forward(q.clone(), k.clone(), v.clone()) {
            Some(fused) => fused.out,
            None => burn_ops::self_attention(q, k, v),
        }
    }

    /// [`self_attention`](Self::self_attention) by a fused kernel that keeps each row's
    /// log-sum-exp rather than the `[seq, seq]` probabilities, for
    /// [`self_attention_backward`](Self::self_attention_backward); `None` where the backend has
    /// no such kernel (the default). `Autodiff<Self>` then registers one backward step for it.
    fn self_attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
    ) -> Option<SelfAttention<Self>> {
        let _ = (q, k, v);
        None
    }

    /// The gradients with respect to `q`, `k` and `v` of a
    /// [`self_attention_forward`](Self::self_attention_forward) that returned `forward`, given
    /// the gradient `dout` of its output. The default recomputes the probabilities from the
    /// log-sum-exp in Burn's ops.
    ///
    /// # Shapes
    /// - as [`self_attention`](Self::self_attention); `dout` like its output
    fn self_attention_backward(
        [q, k, v]: [Tensor<Self, 4>; 3],
        forward: SelfAttention<Self>,
        dout: Tensor<Self, 3>,
    ) -> [Tensor<Self, 4>; 3] {
        burn_ops::self_attention_backward([q, k, v], forward, dout)
    }

    /// The shared exit head's cross-entropy, `sum_r weights[r] * CE(x_r · Wᵀ, targets[r])`
    /// over the whole vocabulary, on `x` already normed (the training loss of one exit, with
    /// `weights` = the loss mask over its count).
    ///
    /// # Shapes
    /// - `x`: `[rows, hidden]`; `targets`, `weights`: `[rows]` -> `[1]`
    fn exit_cross_entropy(
        x: Tensor<Self, 2>,
        head: Head<Self>,
        packed: &Packed,
        targets: Tensor<Self, 1, Int>,
        weights: Tensor<Self, 1>,
    ) -> Tensor<Self, 1> {
        let bf16 = packed.bf16_products;
        let fused = Self::head_cross_entropy(
            x.clone(),
            &head,
            bf16,
            targets.clone(),
            weights.clone(),
            false,
        );
        match fused {
            Some(fused) => fused.loss,
            None => burn_ops::exit_cross_entropy(x, head, targets, weights),
        }
    }

    /// [`exit_cross_entropy`](Self::exit_cross_entropy) by a fused kernel that never holds the
    /// `[rows, vocab]` logits, with (if `grads`) the gradients with respect to `x` and the head
    /// weight computed in the same pass; `None` where the backend has no such kernel (the
    /// default). `Autodiff<Self>` runs it in the forward pass and keeps the gradients for the
    /// backward pass. With `bf16`, its products round their operands to bf16 where the backend
    /// has [`bf16_products`](Self::bf16_products) (the softmax and loss stay f32).
    fn head_cross_entropy(
        x: Tensor<Self, 2>,
        head: &Head<Self>,
        bf16: bool,
        targets: Tensor<Self, 1, Int>,
        weights: Tensor<Self, 1>,
        grads: bool,
    ) -> Option<HeadLoss<Self>> {
        let _ = (x, head, bf16, targets, weights, grads);
        None
    }
}

/// What [`LayerSkipBackend::self_attention_forward`] returns.
#[derive(Debug, Clone)]
pub struct SelfAttention<B: Backend> {
    /// The attention's output `[batch, seq, heads * head_dim]`.
    pub out: Tensor<B, 3>,
    /// Each row's log-sum-exp of the scaled scores `[batch, heads, seq]` (f32).
    pub lse: Tensor<B, 3>,
}

/// What [`LayerSkipBackend::head_cross_entropy`] returns.
#[derive(Debug, Clone)]
pub struct HeadLoss<B: Backend> {
    /// The loss `[1]` (f32).
    pub loss: Tensor<B, 1>,
    /// If asked for: d loss / d x `[rows, hidden]` and d loss / d head weight (in the weight's
    /// shape), each in its input's dtype.
    pub grads: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
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

/// The reference implementation of the seam in Burn's ops (what each default method computes):
/// for a backend implementing [`LayerSkipBackend`] and for tests of a fast path.
pub mod burn_ops;

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
