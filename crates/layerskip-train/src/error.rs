//! The error type of the training crate.

use std::path::PathBuf;

use layerskip_model::ModelError;

/// Errors of training: configs, data, checkpoints, and the model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An invalid configuration value (the message names the field).
    #[error("invalid training config: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The data yield no training block.
    #[error("data: {0}")]
    Data(String),
    /// A multi-node run could not start or lost a node.
    #[error("multi-node training: {0}")]
    Cluster(String),
    /// The loss of a step was NaN or infinite; the step was not applied.
    #[error(
        "the loss of step {step} is {loss} (not finite); the run stopped before applying that step \
         and its last checkpoint is kept. Lower the learning rate, check the data, or resume \
         from an earlier checkpoint"
    )]
    NonFinite {
        /// The step (1-based, as the progress lines count).
        step: usize,
        /// The loss.
        loss: f64,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
