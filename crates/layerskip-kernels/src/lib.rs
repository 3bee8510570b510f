//! # layerskip-kernels
//!
//! The hand-written kernels of the LayerSkip decoder, with no Burn types: the model crate reaches
//! them through its one backend seam (`layerskip_model::ops::LayerSkipBackend`), which converts
//! its tensors to the kernels' arguments.
//!
//! - [`cpu`]: kernels on plain slices (AVX-512 or AVX2 and FMA where the CPU has them, the same
//!   order in scalar code elsewhere): products of up to a few hundred rows with a packed weight
//!   matrix (f32, bf16, or ggml's Q8_0/Q4_0/Q4_1 blocks) split over every core by a persistent
//!   pool, attention over a KV cache buffer, SwiGLU's product, rotary embedding.
//! - `cube` (feature `cube`): CubeCL kernels that run on every CubeCL runtime (CUDA, wgpu on
//!   Vulkan/Metal/DX12): decode attention over the preallocated KV cache, products of a few rows
//!   with a weight matrix, RMSNorm, rotary embedding with the cache write, SwiGLU's product.
//!
//! ```
//! use layerskip_kernels::cpu::silu_mul;
//!
//! let (gate, up) = ([0.0f32, 1.0, -2.0], [3.0f32, 2.0, 1.0]);
//! let mut out = [0.0f32; 3];
//! silu_mul(&gate, &up, &mut out);
//! let silu = |x: f32| x / (1.0 + (-x).exp());
//! assert!(out.iter().zip([silu(0.0) * 3.0, silu(1.0) * 2.0, silu(-2.0)]).all(|(a, b)| (a - b).abs() < 1e-6));
//! ```
//!
//! Every kernel computes each output row alone, in an order that depends only on the shapes of
//! the weights and the number of visible positions, never on how many rows share a launch: one
//! decoded token and a self-speculative verification of several give bit-identical results.

pub mod cpu;
#[cfg(feature = "cube")]
pub mod cube;
