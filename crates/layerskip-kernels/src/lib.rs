//! # layerskip-kernels
//!
//! The hand-written kernels of the LayerSkip decoder, with no Burn types: the model crate reaches
//! them through its one backend seam (`layerskip_model::ops::LayerSkipBackend`), which converts
//! its tensors to the kernels' arguments.
//!
//! - [`cpu`]: kernels on plain slices (AVX2 and FMA where the CPU has them, the same order in
//!   scalar code elsewhere): products of a few rows with a packed weight matrix, attention over a
//!   KV cache buffer, SwiGLU's product, rotary embedding.
//! - `cube` (feature `cube`): CubeCL kernels that run on every CubeCL runtime (CUDA, wgpu on
//!   Vulkan/Metal/DX12): decode attention over the preallocated KV cache, products of a few rows
//!   with a weight matrix, RMSNorm, rotary embedding with the cache write, SwiGLU's product.
//!
//! Every kernel computes each output row alone, in an order that depends only on the shapes of
//! the weights and the number of visible positions, never on how many rows share a launch: one
//! decoded token and a self-speculative verification of several give bit-identical results.

pub mod cpu;
#[cfg(feature = "cube")]
pub mod cube;
