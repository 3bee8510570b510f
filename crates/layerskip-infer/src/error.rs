//! The error type of the inference crate.

use layerskip_model::ModelError;

/// Errors of generation: bad arguments and model failures.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// An argument out of range (exit layer, speculations, temperature, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The prompt leaves no room in the context.
    #[error(
        "prompt of {prompt} tokens does not fit a context of {capacity} positions (at least one must remain for generation)"
    )]
    PromptTooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Context positions.
        capacity: usize,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, InferError>;
