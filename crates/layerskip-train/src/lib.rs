//! # layerskip-train
//!
//! The training half of LayerSkip (arXiv 2404.16710): layer dropout with per-layer and per-step
//! rates, an early-exit loss through the model's one shared exit head with the paper's and
//! torchtune's loss scales, and the rotational and gradual curricula. [`schedule`] holds them as
//! pure functions of (step, layer).
//!
//! [`Trainer`] runs on one device, data-parallel over several devices of one process
//! ([`Trainer::with_data_parallel`]), or as one node of a multi-process run
//! ([`Trainer::join_cluster`], [`distributed`]: gradients summed between processes by Burn's
//! burn-collective); all three give the same training up to float summation order.
//!
//! Two LayerSkip steps on a small model, with the shipped model's tokenizer and recipe:
//!
//! ```
//! use std::path::Path;
//!
//! use burn::backend::{Autodiff, Flex};
//! use layerskip_model::{LlamaConfig, LlamaModel, Tokenizer};
//! use layerskip_train::{Blocks, Document, TrainConfig, Trainer};
//!
//! let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
//! let tokenizer = Tokenizer::from_file(&root.join("models/default")).unwrap();
//! let mut config = TrainConfig::from_file(&root.join("configs/pretrain_from_scratch.toml")).unwrap();
//! (config.steps, config.data.seq_len, config.optim.batch_size) = (2, 32, 2);
//! let text = "def add(a, b):\n    return a + b\n\n".repeat(40);
//! let docs = vec![Document { prompt: None, text }];
//! let blocks = Blocks::pack(&docs, &tokenizer, 0, config.data.seq_len).unwrap();
//! let shape = LlamaConfig { num_layers: 4, hidden_size: 64, intermediate_size: 128,
//!     num_heads: 4, num_kv_heads: 2, head_dim: 16, ..LlamaConfig::default() };
//! let device = Default::default();
//! let model = LlamaModel::<Autodiff<Flex>>::init(&shape, &device).unwrap();
//! let mut trainer = Trainer::new(config, model, blocks.clone(), blocks, device).unwrap();
//! let first = trainer.train_step().unwrap();
//! let second = trainer.train_step().unwrap();
//! assert!(trainer.finished() && first.loss.is_finite() && second.loss.is_finite());
//! ```

pub mod config;
pub mod data;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod loss;
pub mod run_dir;
pub mod schedule;
pub mod tokenizer;
pub mod trainer;

pub use config::TrainConfig;
pub use data::{Blocks, Document};
pub use distributed::{Cluster, ClusterConfig};
pub use error::{Result, TrainError};
pub use run_dir::{RunDir, Start, latest_checkpoint};
pub use trainer::{EvalReport, StepReport, Trainer, saved_config};

use burn::tensor::backend::AutodiffBackend;
use layerskip_model::LayerSkipBackend;

/// A backend the trainer runs on: autodiff (the model's seam takes Burn's ops there, so
/// gradients flow) over a backend the model runs on (evaluation uses its fast paths).
pub trait TrainBackend: AutodiffBackend<InnerBackend: LayerSkipBackend> + LayerSkipBackend {}

impl<B> TrainBackend for B where
    B: AutodiffBackend<InnerBackend: LayerSkipBackend> + LayerSkipBackend
{
}
