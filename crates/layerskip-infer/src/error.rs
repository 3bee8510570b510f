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
    /// The model's logits hold NaN or an infinity: non-finite weights, or an overflow in the
    /// compute dtype.
    #[error(
        "the model produced non-finite logits (NaN or infinity): its weights hold non-finite values or the computation overflowed"
    )]
    NonFiniteLogits,
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, InferError>;
