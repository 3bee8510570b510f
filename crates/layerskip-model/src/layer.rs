//! One pre-norm Llama decoder layer: RMSNorm, grouped-query self-attention with rotary
//! embeddings, RMSNorm, SwiGLU MLP, each behind a residual connection.

use burn::module::{Module, Param};
use burn::nn::{Linear, RmsNorm};
use burn::tensor::{Distribution, Tensor, backend::Backend};

use crate::cache::LayerKvCache;
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::ops::{LayerSkipBackend, Packed};
use crate::rope::RopeTables;

/// A bias-free linear layer with weights drawn from N(0, std²), Hugging Face's Llama init.
pub(crate) fn init_linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    std: f64,
    device: &B::Device,
) -> Linear<B> {
    let weight = Tensor::random([d_in, d_out], Distribution::Normal(0.0, std), device);
    Linear {
        weight: Param::from_tensor(weight),
        bias: None,
    }
}

/// An RMSNorm with unit gain.
pub(crate) fn init_rms_norm<B: Backend>(config: &LlamaConfig, device: &B::Device) -> RmsNorm<B> {
    RmsNorm {
        gamma: Param::from_tensor(Tensor::ones([config.hidden_size], device)),
        epsilon: config.rms_norm_eps,
    }
}

/// The weight of a linear layer of the decoder. Llama's have no bias: checkpoints with
/// `attention_bias` or `mlp_bias` are refused at load, and `init` makes none.
pub(crate) fn weight<B: Backend>(linear: &Linear<B>) -> Tensor<B, 2> {
    debug_assert!(
        linear.bias.is_none(),
        "the decoder's linear layers have no bias"
    );
    linear.weight.val()
}

/// Grouped-query self-attention. Linear weights use Burn's `[d_in, d_out]` layout.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[hidden, num_heads * head_dim]`
    pub q_proj: Linear<B>,
    /// `[hidden, num_kv_heads * head_dim]`
    pub k_proj: Linear<B>,
    /// `[hidden, num_kv_heads * head_dim]`
    pub v_proj: Linear<B>,
    /// `[num_heads * head_dim, hidden]`
    pub o_proj: Linear<B>,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    /// The backend's state for q, k, v and o (see [`Packed`]).
    #[module(skip)]
    pub(crate) packed: [Packed; 4],
}

impl<B: Backend> Attention<B> {
    fn init(config: &LlamaConfig, std: f64, device: &B::Device) -> Self {
        let (h, hd) = (config.hidden_size, config.head_dim);
        Self {
            q_proj: init_linear(h, config.num_heads * hd, std, device),
            k_proj: init_linear(h, config.num_kv_heads * hd, std, device),
            v_proj: init_linear(h, config.num_kv_heads * hd, std, device),
            o_proj: init_linear(config.num_heads * hd, h, std, device),
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: hd,
            packed: Default::default(),
        }
    }
}

impl<B: LayerSkipBackend> Attention<B> {
    /// The attention block with its residual connection: `x + attn(norm(x))`, attending
    /// causally over the cached positions plus the new ones.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; `rope` covers the `seq` new positions
    /// - returns `[batch, seq, hidden]`
    pub fn forward(
        &self,
        norm: &RmsNorm<B>,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        cache: Option<&mut LayerKvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        let groups = self.num_heads / self.num_kv_heads;
        let out = match cache {
            Some(cache) => {
                let [b, s, _] = x.dims();
                let inputs = self.qkv();
                let q = cache.store_with(s, |buffers, at| {
                    B::attention_inputs_stored(x.clone(), norm, inputs, (buffers, at, rope))
                })?;
                let q = q.reshape([b, s, self.num_heads, self.head_dim]);
                B::attend_cached(q, rope, cache.buffers(), cache.len(), groups)
            }
            None => {
                let [q, k, v] = self.heads(norm, x.clone());
                B::self_attention(B::rope(q, rope), B::rope(k, rope), v)
            }
        };
        Ok(self.output(out, x))
    }

    /// `norm(x)`'s queries, keys and values split into heads, `[batch, seq, heads, head_dim]`
    /// (q with `num_heads`, k and v with `num_kv_heads`): one launch of the fused products.
    fn heads(&self, norm: &RmsNorm<B>, x: Tensor<B, 3>) -> [Tensor<B, 4>; 3] {
        let [b, s, _] = x.dims();
        let (weights, packed) = self.qkv();
        let [q, k, v] = B::attention_inputs(x, norm, weights, packed);
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([b, s, n, self.head_dim]);
        [
            heads(q, self.num_heads),
            heads(k, self.num_kv_heads),
            heads(v, self.num_kv_heads),
        ]
    }

    /// The q, k and v weights and the backend's state for them.
    fn qkv(&self) -> ([Tensor<B, 2>; 3], [&Packed; 3]) {
        let [pq, pk, pv, _] = &self.packed;
        let weights = [&self.q_proj, &self.k_proj, &self.v_proj].map(weight);
        (weights, [pq, pk, pv])
    }

    /// The output projection of the attention `out` with the residual `x` added.
    fn output(&self, out: Tensor<B, 3>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        B::product_add(out, weight(&self.o_proj), &self.packed[3], x)
    }

    /// [`Attention::forward`] for one new position of each of several sequences, each with its
    /// own cache and position: the products take every sequence's row in one pass, attention
    /// runs per sequence over its own cache. Row `i` is what `forward` computes for sequence `i`
    /// alone wherever the backend's products compute each row alone (the fused kernels do).
    ///
    /// # Shapes
    /// - `x`: `[sequences, 1, hidden]`; `ropes[i]` covers sequence `i`'s new position
    /// - returns `[sequences, 1, hidden]`
    pub fn forward_each(
        &self,
        norm: &RmsNorm<B>,
        x: Tensor<B, 3>,
        ropes: &[RopeTables<B>],
        caches: &mut [&mut LayerKvCache<B>],
    ) -> Result<Tensor<B, 3>> {
        let [n, s, _] = x.dims();
        debug_assert!(s == 1 && ropes.len() == n && caches.len() == n);
        let [q, k, v] = self.heads(norm, x.clone());
        let groups = self.num_heads / self.num_kv_heads;
        let mut outs = Vec::with_capacity(n);
        for (i, (cache, rope)) in caches.iter_mut().zip(ropes).enumerate() {
            let one = |t: &Tensor<B, 4>| t.clone().slice_dim(0, i..i + 1);
            cache.store(one(&k), one(&v), rope)?;
            outs.push(B::attend_cached(
                one(&q),
                rope,
                cache.buffers(),
                cache.len(),
                groups,
            ));
        }
        Ok(self.output(Tensor::cat(outs, 0), x))
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[hidden, intermediate]`
    pub gate_proj: Linear<B>,
    /// `[hidden, intermediate]`
    pub up_proj: Linear<B>,
    /// `[intermediate, hidden]`
    pub down_proj: Linear<B>,
    /// The backend's state for gate, up and down (see [`Packed`]).
    #[module(skip)]
    pub(crate) packed: [Packed; 3],
}

impl<B: Backend> Mlp<B> {
    fn init(config: &LlamaConfig, std: f64, device: &B::Device) -> Self {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        Self {
            gate_proj: init_linear(h, i, std, device),
            up_proj: init_linear(h, i, std, device),
            down_proj: init_linear(i, h, std, device),
            packed: Default::default(),
        }
    }
}

impl<B: LayerSkipBackend> Mlp<B> {
    /// The MLP block with its residual connection: `x + mlp(norm(x))`.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(&self, norm: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [pg, pu, pd] = &self.packed;
        let gate_up = [&self.gate_proj, &self.up_proj].map(weight);
        let hidden = B::swiglu(x.clone(), norm, gate_up, [pg, pu]);
        B::product_add(hidden, weight(&self.down_proj), pd, x)
    }
}

/// One decoder layer `f_l`: `h = x + attn(norm(x)); out = h + mlp(norm(h))`.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Self-attention.
    pub self_attn: Attention<B>,
    /// SwiGLU MLP.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// A layer with Hugging Face's default initialisation (`initializer_range` = `std`).
    pub fn init(config: &LlamaConfig, std: f64, device: &B::Device) -> Self {
        Self {
            self_attn: Attention::init(config, std, device),
            mlp: Mlp::init(config, std, device),
            input_layernorm: init_rms_norm(config, device),
            post_attention_layernorm: init_rms_norm(config, device),
        }
    }
}

impl<B: LayerSkipBackend> DecoderLayer<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        cache: Option<&mut LayerKvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm, x, rope, cache)?;
        Ok(self.mlp.forward(&self.post_attention_layernorm, h))
    }

    /// [`DecoderLayer::forward`] for one new position of each of several sequences, each with
    /// its own cache (see [`Attention::forward_each`]).
    ///
    /// # Shapes
    /// - `x`: `[sequences, 1, hidden]` -> `[sequences, 1, hidden]`
    pub fn forward_each(
        &self,
        x: Tensor<B, 3>,
        ropes: &[RopeTables<B>],
        caches: &mut [&mut LayerKvCache<B>],
    ) -> Result<Tensor<B, 3>> {
        let h = self
            .self_attn
            .forward_each(&self.input_layernorm, x, ropes, caches)?;
        Ok(self.mlp.forward(&self.post_attention_layernorm, h))
    }
}
