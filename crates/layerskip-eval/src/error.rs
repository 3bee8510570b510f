//! The error type of the evaluation crate.

use layerskip_infer::InferError;

/// Errors of evaluation: unreadable or malformed datasets, and generation failures.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A dataset file could not be read or parsed (the message names the file and line).
    #[error("dataset: {0}")]
    Dataset(String),
    /// Generation failed.
    #[error(transparent)]
    Infer(#[from] InferError),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, EvalError>;
