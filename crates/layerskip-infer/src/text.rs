//! Streaming detokenization: the text each batch of accepted tokens adds, for printing (the CLI)
//! or sending (the server), so that both stream exactly the same text.
//!
//! A token can end inside a multi-byte character: the decoder then shows the partial character
//! as U+FFFD, which the next token turns into the real one, so a trailing U+FFFD is held back
//! until the generation ends. Output is cut at the first stop string, and text that may begin
//! one is held back until the next tokens complete it or not.

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
///
/// Each push decodes only the newest tokens with the batch before them as context (the decoder
/// then renders spaces and merged bytes as in the whole text) and appends the difference, so a
/// generation of n tokens costs O(n) decoding, not O(n^2). A decoder for which a longer window
/// does not extend the shorter one's text falls back to decoding everything.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    tokens: Vec<u32>,
    /// The tokens `prefix..read` are the context decoded with each push's new tokens.
    prefix: usize,
    /// Tokens whose text is final in `text[..confirmed]`.
    read: usize,
    confirmed: usize,
    emitted: usize,
    stops: Vec<String>,
    stopped: bool,
    /// Bytes at the start of the text that the prompt already shows (token healing): never
    /// handed out, never searched for stop strings.
    shown: usize,
    /// The text of every token pushed: `text[..confirmed]` final, the rest the newest tokens'
    /// text, which may still end in a partial character (U+FFFD).
    text: String,
}

impl<'t> TextStream<'t> {
    /// A stream that ends its text before the first of `stops`.
    pub fn new(tokenizer: &'t Tokenizer, stops: Vec<String>) -> Self {
        Self {
            tokenizer,
            tokens: Vec::new(),
            prefix: 0,
            read: 0,
            confirmed: 0,
            emitted: 0,
            stops,
            stopped: false,
            shown: 0,
            text: String::new(),
        }
    }

    /// A stream for a generation whose text begins with `healed`, the text of the prompt token
    /// that token healing took back ([`Tokenizer::healing`]): the stream hands out what follows
    /// it, the continuation of the prompt as the user wrote it.
    pub fn healed(tokenizer: &'t Tokenizer, stops: Vec<String>, healed: &str) -> Self {
        Self {
            shown: healed.len(),
            emitted: healed.len(),
            ..Self::new(tokenizer, stops)
        }
    }

    /// Adds accepted tokens and returns the text they complete (possibly empty). Text that may
    /// be the beginning of a stop string is held back until the next tokens decide. Once a stop
    /// string has appeared, the text ends before it and [`TextStream::stopped`] is true.
    pub fn push(&mut self, tokens: &[u32]) -> String {
        if self.stopped {
            return String::new();
        }
        let searched = self.confirmed;
        self.tokens.extend_from_slice(tokens);
        self.decode_new();
        // A stop string that appears now ends in the new text (after what the prompt shows).
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = searched
            .saturating_sub(longest)
            .max(self.shown)
            .min(self.text.len());
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let cut = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|at| from + at))
            .min();
        self.stopped = cut.is_some();
        let end = match cut {
            Some(at) => at,
            None => self.text.len() - self.partial_stop(),
        };
        self.take(end, self.stopped)
    }

    /// Bytes at the end of the text that begin a stop string (held back: the next tokens may
    /// complete it, and released text cannot be taken back).
    fn partial_stop(&self) -> usize {
        let text = self.text.as_bytes();
        self.stops
            .iter()
            .flat_map(|stop| (1..stop.len()).map(move |l| (stop, l)))
            .filter(|(stop, l)| text.ends_with(&stop.as_bytes()[..*l]))
            .map(|(_, l)| l)
            .max()
            .unwrap_or(0)
    }

    /// Brings `text` up to every pushed token.
    fn decode_new(&mut self) {
        let decode = |ids: &[u32]| self.tokenizer.decode(ids).unwrap_or_default();
        let context = decode(&self.tokens[self.prefix..self.read]);
        let window = decode(&self.tokens[self.prefix..]);
        let Some(added) = window.strip_prefix(context.as_str()) else {
            // Not prefix-stable: decode everything, as a whole.
            self.text = decode(&self.tokens);
            self.prefix = 0;
            self.read = 0;
            self.confirmed = 0;
            return;
        };
        self.text.truncate(self.confirmed);
        self.text.push_str(added);
        if !added.ends_with('\u{FFFD}') {
            // Complete: the next push decodes after these tokens, with them as context.
            self.confirmed = self.text.len();
            self.prefix = self.read;
            self.read = self.tokens.len();
        }
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
        self.text.get(self.shown..self.emitted).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::{TextStream, printable_end};
    use layerskip_model::Tokenizer;

    /// The byte-level BPE tokenizer of the model that ships in `models/default`.
    fn tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
        Tokenizer::from_file(&dir).unwrap()
    }

    const TEXTS: [&str; 3] = [
        "def parse(argv):\n    \"\"\"Parse the arguments.\"\"\"\n    return [a.strip() for a in argv]\n",
        "日本語のテキスト、絵文字 🦀🐍 と記号 ±∞ が混ざる。",
        "  leading spaces,\ttabs\n\n and a trailing space ",
    ];

    /// Streamed in batches of every size from 1 to 5 tokens, the deltas plus what `finish`
    /// releases are exactly the whole decode of the tokens (characters split over tokens
    /// included), and no delta ever holds a partial character.
    #[test]
    fn streamed_text_is_the_whole_decode_for_every_batching() {
        let tokenizer = tokenizer();
        for text in TEXTS {
            let ids = tokenizer.encode(text).unwrap();
            let whole = tokenizer.decode(&ids).unwrap();
            for batch in 1..=5 {
                let mut stream = TextStream::new(&tokenizer, Vec::new());
                let mut out = String::new();
                for chunk in ids.chunks(batch) {
                    let delta = stream.push(chunk);
                    assert!(!delta.contains('\u{FFFD}'), "{delta:?}");
                    out.push_str(&delta);
                }
                out.push_str(&stream.finish());
                assert_eq!(out, whole, "batch {batch}");
                assert_eq!(stream.emitted(), whole);
            }
        }
    }

    /// A stop string ends the text where it first appears in the whole decode, also when it
    /// spans two pushes; nothing after it is released.
    #[test]
    fn stop_strings_cut_where_the_whole_text_has_them() {
        let tokenizer = tokenizer();
        let text = TEXTS[0];
        let ids = tokenizer.encode(text).unwrap();
        let whole = tokenizer.decode(&ids).unwrap();
        for stop in ["\"\"\"", "return", "strip()", "\n    r"] {
            let want = &whole[..whole.find(stop).unwrap()];
            for batch in 1..=3 {
                let mut stream = TextStream::new(&tokenizer, vec![stop.to_string(), "#~#".into()]);
                let mut out = String::new();
                for chunk in ids.chunks(batch) {
                    out.push_str(&stream.push(chunk));
                }
                out.push_str(&stream.finish());
                assert!(stream.stopped(), "{stop:?}");
                assert_eq!(out, want, "{stop:?} batch {batch}");
            }
        }
    }

    /// Token healing: the prompt's trailing newline taken back, the model's first token begins
    /// with it ("\n    " here). The stream hands out the text after that newline, in every
    /// batching, and a stop string is looked for only there: "\n" ends the text at the
    /// generation's own first newline, not at the prompt's.
    #[test]
    fn a_healed_stream_hands_out_what_follows_the_prompt() {
        let tokenizer = tokenizer();
        let prompt = "def parse(argv):\n";
        let body = "    return [a.strip() for a in argv]\n    # done\n";
        let ids = tokenizer.encode(&format!("{prompt}{body}")).unwrap();
        let healing = tokenizer
            .healing(&tokenizer.encode(prompt).unwrap())
            .unwrap();
        assert_eq!(healing.text, "\n");
        let generated = &ids[healing.prompt.len()..];
        assert!(healing.allowed.contains(&generated[0]), "{generated:?}");
        for batch in 1..=3 {
            for (stops, want) in [
                (vec![], body),
                (
                    vec!["\n".to_string()],
                    "    return [a.strip() for a in argv]",
                ),
            ] {
                let mut stream = TextStream::healed(&tokenizer, stops.clone(), &healing.text);
                let mut out = String::new();
                for chunk in generated.chunks(batch) {
                    out.push_str(&stream.push(chunk));
                }
                out.push_str(&stream.finish());
                assert_eq!(out, want, "{stops:?} batch {batch}");
                assert_eq!(stream.emitted(), want);
            }
        }
    }

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
