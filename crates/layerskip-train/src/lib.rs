//! # layerskip-train
//!
//! The training half of LayerSkip (arXiv 2404.16710): layer dropout with per-layer and per-step
//! rates, an early-exit loss through the model's one shared exit head with the paper's and
//! torchtune's loss scales, and the rotational and gradual curricula. [`schedule`] holds them as
//! pure functions of (step, layer).

pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod loss;
pub mod schedule;
pub mod tokenizer;
pub mod trainer;

pub use config::TrainConfig;
pub use data::{Blocks, Document};
pub use error::{Result, TrainError};
pub use trainer::{EvalReport, StepReport, Trainer, latest_checkpoint};

use burn::tensor::backend::AutodiffBackend;
use layerskip_model::LayerSkipBackend;

/// A backend the trainer runs on: autodiff (the model's seam takes Burn's ops there, so
/// gradients flow) over a backend the model runs on (evaluation uses its fast paths).
pub trait TrainBackend: AutodiffBackend<InnerBackend: LayerSkipBackend> + LayerSkipBackend {}

impl<B> TrainBackend for B where
    B: AutodiffBackend<InnerBackend: LayerSkipBackend> + LayerSkipBackend
{
}
