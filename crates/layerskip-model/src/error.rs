//! The error type of this crate: every failure that user input (files, configs, arguments) can cause.

use std::path::{Path, PathBuf};

/// Errors of the model crate. Each names the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error (shown in the message, so not chained as a source).
        error: std::io::Error,
    },
    /// A file exists but its content could not be parsed.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A configuration asks for something this implementation does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A checkpoint tensor is missing.
    #[error("{path}: missing tensor {name:?}")]
    MissingTensor {
        /// The checkpoint file (or index) searched.
        path: PathBuf,
        /// The Hugging Face tensor name.
        name: String,
    },
    /// A checkpoint tensor has the wrong shape.
    #[error("{path}: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    WrongShape {
        /// The checkpoint file.
        path: PathBuf,
        /// The Hugging Face tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape on disk.
        found: Vec<usize>,
    },
    /// A checkpoint tensor has a dtype that cannot be loaded.
    #[error("{path}: tensor {name:?} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// Decoding would run past the preallocated context.
    #[error(
        "context overflow: {requested} positions requested but the context holds {capacity} (max_position_embeddings or the cache capacity)"
    )]
    ContextOverflow {
        /// Positions that would be in the cache after the call.
        requested: usize,
        /// The cache capacity.
        capacity: usize,
    },
    /// A layer range or layer index outside `0..num_layers`.
    #[error(
        "layer {layer}'s cache holds {held} positions, but the input starts at position {start}"
    )]
    CachePosition {
        /// The layer.
        layer: usize,
        /// Positions its cache holds.
        held: usize,
        /// The input's first position.
        start: usize,
    },

    #[error("layer range {start}..{end} is invalid for a model with {num_layers} layers")]
    LayerRange {
        /// First layer.
        start: usize,
        /// One past the last layer.
        end: usize,
        /// Layers in the model.
        num_layers: usize,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An exit head over a vocabulary prefix that is empty or larger than the vocabulary.
    #[error("vocabulary prefix of {requested} tokens is invalid: the vocabulary has {vocab_size}")]
    VocabPrefix {
        /// Tokens asked for.
        requested: usize,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            error: source,
        }
    }

    pub(crate) fn parse(path: &Path, message: impl Into<String>) -> Self {
        ModelError::Parse {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    /// Attaches a file name to a config error raised while reading that file.
    pub(crate) fn in_file(self, path: &Path) -> Self {
        match self {
            ModelError::InvalidConfig(m) | ModelError::Unsupported(m) => Self::parse(path, m),
            other => other,
        }
    }
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
