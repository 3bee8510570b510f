//! The checkpoint's `tokenizer.json`, through the Hugging Face `tokenizers` crate.

use std::path::Path;

use crate::error::{ModelError, Result};

/// A text tokenizer loaded from a Hugging Face `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `tokenizer.json` (a file, or a checkpoint directory containing one).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        if !file.is_file() {
            return Err(ModelError::io(
                &file,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer file not found"),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| ModelError::parse(&file, format!("invalid tokenizer: {e}")))?;
        Ok(Self { inner })
    }

    /// Wraps an already built tokenizer.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self { inner }
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Text to token ids, without adding special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids to text (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Fails if the tokenizer can produce ids that the model has no embedding for (a vocabulary
    /// larger than the model's `vocab_size`: a tokenizer of another model). `dir` names the
    /// checkpoint in the error.
    pub fn check_fits(&self, model_vocab: usize, dir: &Path) -> Result<()> {
        let ids = self.vocab_size();
        if ids > model_vocab {
            return Err(ModelError::parse(
                dir,
                format!(
                    "the tokenizer has {ids} tokens but the model's vocab_size is {model_vocab}: \
                     the tokenizer belongs to another model"
                ),
            ));
        }
        Ok(())
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
