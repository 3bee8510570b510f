//! One pre-norm Llama decoder layer: RMSNorm, grouped-query self-attention with rotary
//! embeddings, RMSNorm, SwiGLU MLP, each behind a residual connection.

use burn::module::{Module, Param};
use burn::nn::{Linear, RmsNorm};
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Int, Tensor, TensorData, backend::Backend};

use crate::cache::LayerKvCache;
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::rope::RopeTables;
use crate::rows;

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

/// `[b, kv_heads, t, d]` -> `[b, kv_heads * groups, t, d]`, head `h` reading kv head
/// `h / groups`. A `select` along the head axis: on Flex it is ~8x faster than expand + reshape,
/// which takes a strided copy path.
pub(crate) fn repeat_kv<B: Backend>(x: Tensor<B, 4>, groups: usize) -> Tensor<B, 4> {
    if groups == 1 {
        return x;
    }
    let heads = x.dims()[1] * groups;
    let index: Vec<i64> = (0..heads).map(|h| (h / groups) as i64).collect();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [heads]), &x.device());
    x.select(1, index)
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
    /// Packed copies of q, k, v and o for the row kernels, made on first use.
    #[module(skip)]
    pub(crate) packed: [rows::Packed; 4],
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

    /// Attends causally over the cached positions plus the new ones.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` (already normalised); `rope` covers the `seq` new positions
    /// - returns `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        cache: Option<&mut LayerKvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        let [b, s, _] = x.dims();
        let [pq, pk, pv, po] = &self.packed;
        let heads = |proj: &Linear<B>, packed: &rows::Packed, n: usize| {
            rows::linear(proj, packed, x.clone()).reshape([b, s, n, self.head_dim])
        };
        let q = rope.apply_seq_major(heads(&self.q_proj, pq, self.num_heads));
        let k = rope.apply_seq_major(heads(&self.k_proj, pk, self.num_kv_heads));
        let v = heads(&self.v_proj, pv, self.num_kv_heads);
        let groups = self.num_heads / self.num_kv_heads;
        // Decoding and verification on Flex: attention straight over the cache buffers (no
        // gathered copy of the cached prefix, no strided head-major views).
        #[cfg(feature = "flex")]
        let cache = match cache {
            Some(cache) if cache.can_attend(&q) => {
                let out = cache.attend(q, k, v, groups)?;
                return Ok(rows::linear(&self.o_proj, po, out));
            }
            other => other,
        };
        // [batch, seq, n, head_dim] -> [batch, n, seq, head_dim]
        let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
        // [batch, heads, total, head_dim], query head `h` reading kv head `h / groups`: the causal
        // mask is aligned bottom-right, so the new positions see every cached position and the
        // earlier new ones.
        let (k, v) = match cache {
            Some(cache) => cache.append_for_heads(k, v, groups)?,
            None => (repeat_kv(k, groups), repeat_kv(v, groups)),
        };
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let out = attention(q, k, v, None, None, options);
        let out = out
            .swap_dims(1, 2)
            .reshape([b, s, self.num_heads * self.head_dim]);
        Ok(rows::linear(&self.o_proj, po, out))
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
    /// Packed copies of gate, up and down for the row kernels, made on first use.
    #[module(skip)]
    pub(crate) packed: [rows::Packed; 3],
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

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [pg, pu, pd] = &self.packed;
        let gate = rows::linear(&self.gate_proj, pg, x.clone());
        let up = rows::linear(&self.up_proj, pu, x);
        #[cfg(feature = "flex")]
        let product = crate::flex::silu_mul(&gate, &up).unwrap_or_else(|| silu(gate) * up);
        #[cfg(not(feature = "flex"))]
        let product = silu(gate) * up;
        rows::linear(&self.down_proj, pd, product)
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

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        cache: Option<&mut LayerKvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), rope, cache)?;
        let h = x + attn;
        let mlp = self
            .mlp
            .forward(self.post_attention_layernorm.forward(h.clone()));
        Ok(h + mlp)
    }
}
