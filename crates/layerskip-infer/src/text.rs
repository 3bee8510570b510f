//! Streaming detokenization: the text each batch of accepted tokens adds, for printing (the CLI)
//! or sending (the server), so that both stream exactly the same text.
//!
//! A token can end inside a multi-byte character: the decoder then shows the partial character
//! as U+FFFD, which the next token turns into the real one, so a trailing U+FFFD is held back
//! until the generation ends. Output is cut at the first stop string.

use layerskip_model::Tokenizer;

/// The end of what can be emitted of `text[..end]`: all of it at the end of the generation
/// (`last`), else all but a trailing U+FFFD.
pub fn printable_end(text: &str, end: usize, last: bool) -> usize {
    if last {
        return end;
    }
    text[..end].trim_end_matches('\u{FFFD}').len()
}

/// Decodes a growing token list and hands out only what it adds.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    tokens: Vec<u32>,
    emitted: usize,
    stops: Vec<String>,
    stopped: bool,
    text: String,
}

impl<'t> TextStream<'t> {
    /// A stream that ends its text before the first of `stops`.
    pub fn new(tokenizer: &'t Tokenizer, stops: Vec<String>) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            emitted: 0,
            stops,
            stopped: false,
            text: String::new(),
        }
    }

    /// Adds accepted tokens and returns the text they complete (possibly empty). Once a stop
    /// string has appeared, the text ends before it and [`TextStream::stopped`] is true.
    pub fn push(&mut self, tokens: &[u32]) -> String {
        if self.stopped {
            return String::new();
        }
        self.tokens.extend_from_slice(tokens);
        self.text = self.tokenizer.decode(&self.tokens).unwrap_or_default();
        let cut = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        self.stopped = cut.is_some();
        let end = cut.unwrap_or(self.text.len());
        self.take(end, self.stopped)
    }

    /// What was held back, at the end of the generation.
    pub fn finish(&mut self) -> String {
        let end = if self.stopped {
            self.emitted
        } else {
            self.text.len()
        };
        self.take(end, true)
    }

    fn take(&mut self, end: usize, last: bool) -> String {
        let end = printable_end(&self.text, end, last);
        if end > self.emitted && self.text.is_char_boundary(self.emitted) {
            let delta = self.text[self.emitted..end].to_string();
            self.emitted = end;
            delta
        } else {
            String::new()
        }
    }

    /// Whether a stop string has appeared.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text handed out so far.
    pub fn emitted(&self) -> &str {
        &self.text[..self.emitted]
    }
}

#[cfg(test)]
mod tests {
    use super::printable_end;

    /// A character split over two tokens: the first decodes to a trailing U+FFFD, which is held
    /// back; the completed character then prints whole. At the end, whatever remains prints.
    #[test]
    fn a_split_character_is_held_back_until_it_is_complete() {
        let partial = "ab\u{FFFD}";
        assert_eq!(printable_end(partial, partial.len(), false), 2);
        let whole = "abあ";
        assert_eq!(&whole[2..printable_end(whole, whole.len(), false)], "あ");
        assert_eq!(printable_end(partial, partial.len(), true), partial.len());
        // A U+FFFD that later text follows is the model's own output: it prints.
        let inner = "a\u{FFFD}b";
        assert_eq!(printable_end(inner, inner.len(), false), inner.len());
    }
}
