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

    /// Token healing of the prompt `ids` (Guidance's, Hugging Face's `token_healing`): the
    /// prompt's last token is taken back and the first generated token must begin with its
    /// text, so that a prompt cut where the tokenizer would have merged on (a trailing newline
    /// before an indented line, a trailing space before a word) continues as the tokenizer writes
    /// such text. `None` when there is nothing to heal: fewer than two tokens, a last token that
    /// is an added (special) token, or one that no other token begins with.
    ///
    /// The tokens are compared as vocabulary strings (byte-level BPE's byte alphabet,
    /// SentencePiece's `▁` pieces), in which "begins with" is the same as for their bytes.
    pub fn healing(&self, ids: &[u32]) -> Option<Healing> {
        let (&last, kept) = ids.split_last()?;
        if kept.is_empty() {
            return None;
        }
        // A token that ends inside a character has no text of its own to continue.
        let text = self
            .decode(&[last])
            .ok()
            .filter(|t| !t.contains('\u{FFFD}'))?;
        let vocab = self.inner.get_vocab(false);
        let piece = self.inner.id_to_token(last)?;
        if vocab.get(&piece) != Some(&last) {
            return None;
        }
        let mut allowed: Vec<u32> = vocab
            .iter()
            .filter(|(p, _)| p.starts_with(piece.as_str()))
            .map(|(_, &id)| id)
            .collect();
        if allowed.len() < 2 {
            return None;
        }
        allowed.sort_unstable();
        Some(Healing {
            prompt: kept.to_vec(),
            text,
            allowed,
        })
    }
}

/// A prompt with its last token taken back ([`Tokenizer::healing`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Healing {
    /// The prompt without its last token: what the model is given.
    pub prompt: Vec<u32>,
    /// The text of the token taken back: the first generated token begins with it, and the
    /// continuation of the original prompt is the generated text after it.
    pub text: String,
    /// The ids the first generated token is chosen among (sorted): every token whose text
    /// begins with `text`, the one taken back included.
    pub allowed: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::Tokenizer;

    /// The byte-level BPE tokenizer of the model that ships in `models/default`.
    fn tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
        Tokenizer::from_file(&dir).unwrap()
    }

    /// The ids healing allows are exactly the tokens whose own decoded text begins with the
    /// text taken back (found here by decoding every id, not by the vocabulary's strings); the
    /// prompt loses its last token only. Nothing to heal: one token, an added token.
    #[test]
    fn healing_allows_every_token_that_begins_with_the_last_ones_text() {
        let tokenizer = tokenizer();
        for prompt in ["def f(x):\n", "import os\nimport", "x = 1 +"] {
            let ids = tokenizer.encode(prompt).unwrap();
            let healing = tokenizer.healing(&ids).unwrap();
            assert_eq!(healing.prompt, ids[..ids.len() - 1]);
            let last = tokenizer.decode(&ids[ids.len() - 1..]).unwrap();
            assert_eq!(healing.text, last);
            let want: Vec<u32> = (0..tokenizer.vocab_size() as u32)
                .filter(|&id| tokenizer.decode(&[id]).unwrap().starts_with(last.as_str()))
                .collect();
            assert_eq!(healing.allowed, want, "{prompt:?}");
            assert!(want.len() > 1 && want.contains(&ids[ids.len() - 1]));
        }
        let one = tokenizer.encode("import").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(tokenizer.healing(&one), None);
        let eos = tokenizer.token_id("<|endoftext|>").unwrap();
        let mut ids = tokenizer.encode("x = 1").unwrap();
        ids.push(eos);
        assert_eq!(tokenizer.healing(&ids), None);
    }
}
