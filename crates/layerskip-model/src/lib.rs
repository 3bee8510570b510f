//! # layerskip-model
//!
//! A backend-generic Llama decoder with the surface LayerSkip needs (arXiv 2404.16710):
//!
//! - [`LlamaModel::forward_layers`] runs any contiguous range of layers over all positions, from
//!   any start position, appending to a per-layer [`KvCache`];
//! - [`LlamaModel::exit_head`] is the shared exit (final RMSNorm + LM head), callable on the
//!   output of any layer;
//! - [`LlamaModel::forward_train`] returns the hidden states of chosen exit layers and the final
//!   logits, and takes a per-layer, per-sequence [`SkipMask`] (layer dropout as a mechanism);
//! - [`KvCache`] and [`ExitHiddenCache`] are written at positions (the KV buffers growing to the
//!   capacity as needed), so rollback is a change of length;
//! - [`LlamaModel::from_pretrained`] / [`LlamaModel::save_pretrained`] read and write the Hugging
//!   Face layout (`config.json`, safetensors in f32/f16/bf16, memory-mapped).
//!
//! The same code runs on every Burn backend: fast paths plug in behind one seam,
//! [`ops::LayerSkipBackend`] (Flex kernels on the CPU, CubeCL kernels on CUDA and wgpu, Burn's ops
//! elsewhere); [`backend::Precision`] is the compute dtype.
//!
//! ```
//! use burn::backend::Flex;
//! use layerskip_model::{KvCache, LlamaConfig, LlamaModel};
//!
//! let config = LlamaConfig {
//!     vocab_size: 64, hidden_size: 32, intermediate_size: 64, num_layers: 4,
//!     num_heads: 4, num_kv_heads: 2, head_dim: 8, max_position_embeddings: 128,
//!     eos_token_ids: vec![],
//!     ..LlamaConfig::default()
//! };
//! let device = Default::default();
//! let model = LlamaModel::<Flex>::init(&config, &device).unwrap();
//! let mut cache = KvCache::new(&config, 1, 128, &device);
//! // Early exit after 2 of the 4 layers.
//! let x = model.forward_layers(model.embed_ids(&[1, 2, 3]), 0..2, 0, Some(&mut cache)).unwrap();
//! let logits = model.exit_head(x);
//! assert_eq!(logits.dims(), [1, 3, 64]);
//! ```

pub mod backend;
mod cache;
pub mod checkpoint;
mod config;
mod convert;
mod error;
mod gguf;
mod layer;
mod model;
pub mod ops;
mod rope;
mod tokenizer;

pub use cache::{ExitHiddenCache, KV_FIRST_ALLOCATION, KvCache, LayerKvCache};
pub use checkpoint::{Recommendation, SafetensorsFiles, SaveDtype};
pub use config::{
    HfLlamaConfig, HfRopeParameters, Llama3RopeScaling, LlamaConfig, OneOrMany, RopeConfig,
};
pub use convert::{ConvertReport, convert_gguf};
pub use error::{ModelError, Result};
pub use layer::{Attention, DecoderLayer, Mlp};
pub use model::{LlamaModel, SkipMask, TrainHidden, TrainOutput};
pub use ops::{LayerSkipBackend, Quantization};
pub use rope::{Rope, RopeTables};
pub use tokenizer::{Healing, Tokenizer};
