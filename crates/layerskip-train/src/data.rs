//! The data pipeline: text files, directories and JSONL (`text`, or `prompt`/`response` with the
//! loss on the response only), tokenised, split into train / held-out by document, and packed
//! into fixed-length blocks. Batch order is a pure function of (seed, step), so a resumed run sees
//! exactly the batches the uninterrupted run would have seen.

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use layerskip_model::Tokenizer;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{Result, TrainError};

/// One document: an optional prompt (no loss) and the text the model learns.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Context without loss (JSONL `prompt`).
    pub prompt: Option<String>,
    /// Text with loss (`text`, `response`, or a whole file).
    pub text: String,
}

/// A `data.paths` entry that stands for the standard library of the `python3` on the PATH,
/// resolved when the data are read (presets use it instead of a versioned path such as
/// `/usr/lib/python3.11`, which exists only where that Python is installed).
pub const PYTHON_STDLIB: &str = "@python-stdlib";

/// The directory of the standard library of the `python3` on the PATH.
pub fn python_stdlib() -> Result<PathBuf> {
    let failed = |m: String| {
        TrainError::Data(format!(
            "data.paths names {PYTHON_STDLIB}: {m}; install Python 3 or give --data PATH"
        ))
    };
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('stdlib'))",
        ])
        .output()
        .map_err(|e| failed(format!("cannot run python3 ({e})")))?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !dir.is_dir() {
        return Err(failed(format!(
            "python3 did not name its standard library ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(dir)
}

/// `paths` with [`PYTHON_STDLIB`] replaced by the directory it stands for.
pub fn resolve_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    paths
        .iter()
        .map(|p| {
            if p.as_os_str() == PYTHON_STDLIB {
                python_stdlib()
            } else {
                Ok(p.clone())
            }
        })
        .collect()
}

/// The documents read from a set of paths, and what was left out.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    /// The documents, in file order.
    pub documents: Vec<Document>,
    /// The paths read, [`PYTHON_STDLIB`] resolved.
    pub sources: Vec<PathBuf>,
    /// Files skipped because they are not UTF-8 text (binary files, other encodings).
    pub skipped: Vec<PathBuf>,
}

impl Corpus {
    /// The paths read, for a log line.
    pub fn describe_sources(&self) -> String {
        let names: Vec<String> = self
            .sources
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        names.join(", ")
    }

    /// "skipped N files that are not UTF-8 text (e.g. PATH)", if any was.
    pub fn describe_skipped(&self) -> Option<String> {
        let first = self.skipped.first()?;
        Some(format!(
            "skipped {} file(s) that are not UTF-8 text (e.g. {})",
            self.skipped.len(),
            first.display()
        ))
    }
}

/// Reads documents from files and directories (recursively, sorted). `.jsonl` files give one
/// document per line; other files are one document each. In directories only files whose
/// extension is in `extensions` are read (all files when empty). Files that are not UTF-8 are
/// skipped and listed in [`Corpus::skipped`].
pub fn read_corpus(paths: &[PathBuf], extensions: &[String]) -> Result<Corpus> {
    let sources = resolve_paths(paths)?;
    let mut corpus = Corpus::default();
    for file in list_files(&sources, extensions)? {
        let io = |e: std::io::Error| TrainError::File {
            path: file.clone(),
            message: e.to_string(),
        };
        let bytes = std::fs::read(&file).map_err(io)?;
        let Ok(text) = String::from_utf8(bytes) else {
            corpus.skipped.push(file);
            continue;
        };
        if file.extension().is_some_and(|e| e == "jsonl") {
            for (n, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                corpus
                    .documents
                    .push(parse_jsonl_line(line).map_err(|m| TrainError::File {
                        path: file.clone(),
                        message: format!("line {}: {m}", n + 1),
                    })?);
            }
        } else if !text.trim().is_empty() {
            corpus.documents.push(Document { prompt: None, text });
        }
    }
    corpus.sources = sources;
    Ok(corpus)
}

/// The documents of [`read_corpus`].
pub fn read_documents(paths: &[PathBuf], extensions: &[String]) -> Result<Vec<Document>> {
    Ok(read_corpus(paths, extensions)?.documents)
}

/// The files under `paths` (recursively, sorted; directories filtered by `extensions`;
/// [`PYTHON_STDLIB`] resolved).
pub fn list_files(paths: &[PathBuf], extensions: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in resolve_paths(paths)? {
        collect_files(&path, extensions, &mut files)?;
    }
    Ok(files)
}

fn collect_files(path: &Path, extensions: &[String], out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| TrainError::File {
        path: path.into(),
        message: e.to_string(),
    })?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| TrainError::File {
            path: path.into(),
            message: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect_files(&entry, extensions, out)?;
        } else {
            let ext = entry.extension().and_then(|e| e.to_str()).unwrap_or("");
            if extensions.is_empty() || extensions.iter().any(|x| x == ext) {
                out.push(entry);
            }
        }
    }
    Ok(())
}

fn parse_jsonl_line(line: &str) -> std::result::Result<Document, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
    match (field("text"), field("prompt"), field("response")) {
        (Some(text), None, None) => Ok(Document { prompt: None, text }),
        (None, Some(prompt), Some(response)) => Ok(Document {
            prompt: Some(prompt),
            text: response,
        }),
        _ => Err("expected {\"text\": ...} or {\"prompt\": ..., \"response\": ...}".into()),
    }
}

/// The order of `n` blocks in `epoch`: a permutation seeded by `seed + epoch`.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed.wrapping_add(epoch as u64),
    ));
    order
}

/// Fixed-length training blocks: `seq_len + 1` tokens each, with a 0/1 loss mask per target.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocks {
    /// Token ids, `seq_len + 1` per block.
    pub tokens: Vec<Vec<u32>>,
    /// Loss mask of the `seq_len` targets of each block.
    pub mask: Vec<Vec<f32>>,
    /// Tokens the model reads per block.
    pub seq_len: usize,
}

impl Blocks {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there is no block.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Tokenises `docs` (document boundaries marked by `eos`) and packs them into blocks; the
    /// remainder shorter than a block is dropped.
    pub fn pack(
        docs: &[Document],
        tokenizer: &Tokenizer,
        eos: u32,
        seq_len: usize,
    ) -> Result<Self> {
        // Documents are encoded in parallel (a corpus of a few hundred MB takes minutes on one
        // core) and concatenated in their order.
        let encoded = docs
            .par_iter()
            .map(|doc| {
                let prompt = doc
                    .prompt
                    .as_deref()
                    .map(|p| tokenizer.encode(p))
                    .transpose()?;
                Ok((prompt, tokenizer.encode(&doc.text)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut stream: Vec<u32> = Vec::new();
        let mut loss: Vec<f32> = Vec::new();
        for (prompt, ids) in encoded {
            if let Some(p) = prompt {
                loss.extend(std::iter::repeat_n(0.0, p.len()));
                stream.extend(p);
            }
            loss.extend(std::iter::repeat_n(1.0, ids.len() + 1));
            stream.extend(ids);
            stream.push(eos);
        }
        let block = seq_len + 1;
        let n = stream.len() / block;
        Ok(Self {
            tokens: (0..n)
                .map(|i| stream[i * block..(i + 1) * block].to_vec())
                .collect(),
            // Target j of a block is token j + 1; its mask is that token's.
            mask: (0..n)
                .map(|i| loss[i * block + 1..(i + 1) * block].to_vec())
                .collect(),
            seq_len,
        })
    }

    /// Block indices of batch `batch` (0-based over the whole run): a seeded permutation per epoch.
    pub fn batch_indices(&self, seed: u64, batch: usize, batch_size: usize) -> Vec<usize> {
        let n = self.len();
        // A batch spans one epoch, or two at a boundary: each epoch's order is drawn once.
        let mut order: Option<(usize, Vec<usize>)> = None;
        (0..batch_size)
            .map(|i| {
                let global = batch * batch_size + i;
                let (epoch, pos) = (global / n, global % n);
                if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    order = Some((epoch, epoch_order(n, seed, epoch)));
                }
                order.as_ref().expect("drawn above").1[pos]
            })
            .collect()
    }

    /// Number of target positions that count towards the loss in the given blocks.
    pub fn loss_tokens(&self, indices: &[usize]) -> f64 {
        indices
            .iter()
            .map(|&i| self.mask[i].iter().map(|&m| f64::from(m)).sum::<f64>())
            .sum()
    }

    /// Inputs `[b, seq]`, targets `[b, seq]` and loss mask `[b, seq]` of the given blocks.
    pub fn tensors<B: Backend>(
        &self,
        indices: &[usize],
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>, Tensor<B, 2>) {
        let (b, s) = (indices.len(), self.seq_len);
        let mut inputs = Vec::with_capacity(b * s);
        let mut targets = Vec::with_capacity(b * s);
        let mut mask = Vec::with_capacity(b * s);
        for &i in indices {
            inputs.extend(self.tokens[i][..s].iter().map(|&t| t as i64));
            targets.extend(self.tokens[i][1..].iter().map(|&t| t as i64));
            mask.extend_from_slice(&self.mask[i]);
        }
        (
            Tensor::from_data(TensorData::new(inputs, [b, s]), device),
            Tensor::from_data(TensorData::new(targets, [b, s]), device),
            Tensor::from_data(TensorData::new(mask, [b, s]), device),
        )
    }
}

/// Splits documents into (train, held-out) after a seeded shuffle: `eval_fraction` of the
/// documents (at least one) are held out, none when it is 0. A single document is cut at a line
/// boundary instead, its last `eval_fraction` held out.
pub fn split(
    mut docs: Vec<Document>,
    eval_fraction: f64,
    seed: u64,
) -> Result<(Vec<Document>, Vec<Document>)> {
    if docs.is_empty() {
        return Err(TrainError::Data("no document to train on".into()));
    }
    if eval_fraction <= 0.0 {
        return Ok((docs, Vec::new()));
    }
    if docs.len() == 1 {
        let doc = docs.pop().expect("one document");
        let target = (doc.text.len() as f64 * (1.0 - eval_fraction)) as usize;
        // The line end nearest the target, leaving text on both sides.
        let cut = doc
            .text
            .match_indices('\n')
            .map(|(i, _)| i + 1)
            .filter(|&i| i < doc.text.len())
            .min_by_key(|&i| i.abs_diff(target));
        let Some(cut) = cut else {
            return Err(TrainError::Data(
                "a single one-line document cannot be split into training and held-out text; \
                 give more data or set data.eval_fraction = 0"
                    .into(),
            ));
        };
        let (head, tail) = doc.text.split_at(cut);
        let part = |text: &str| Document {
            prompt: doc.prompt.clone(),
            text: text.to_string(),
        };
        return Ok((vec![part(head)], vec![part(tail)]));
    }
    docs.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let held = ((docs.len() as f64 * eval_fraction).round() as usize).clamp(1, docs.len() - 1);
    let eval = docs.split_off(docs.len() - held);
    Ok((docs, eval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines() {
        assert_eq!(
            parse_jsonl_line(r#"{"text": "a"}"#).unwrap(),
            Document {
                prompt: None,
                text: "a".into()
            }
        );
        let d = parse_jsonl_line(r#"{"prompt": "q", "response": "r"}"#).unwrap();
        assert_eq!(d.prompt.as_deref(), Some("q"));
        assert!(parse_jsonl_line(r#"{"prompt": "q"}"#).is_err());
        assert!(parse_jsonl_line("not json").is_err());
    }

    #[test]
    fn split_holds_out_a_fraction_cuts_a_single_document_and_honours_zero() {
        let doc = |t: &str| Document {
            prompt: None,
            text: t.into(),
        };
        let docs: Vec<Document> = (0..10).map(|i| doc(&format!("doc {i}\n"))).collect();
        let (train, eval) = split(docs.clone(), 0.2, 7).unwrap();
        assert_eq!((train.len(), eval.len()), (8, 2));
        let (train, eval) = split(docs.clone(), 0.0, 7).unwrap();
        assert_eq!((train.len(), eval.len()), (10, 0));

        let one = doc("a = 1\nb = 2\nc = 3\nd = 4\ne = 5\n");
        let (train, eval) = split(vec![one], 0.2, 7).unwrap();
        assert_eq!(train[0].text, "a = 1\nb = 2\nc = 3\nd = 4\n");
        assert_eq!(eval[0].text, "e = 5\n");
        assert!(split(vec![doc("one line")], 0.1, 7).is_err());
        assert!(split(Vec::new(), 0.1, 7).is_err());
    }

    #[test]
    fn non_utf8_files_are_skipped_and_named() {
        let dir = std::env::temp_dir().join(format!("layerskip-corpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.py"), "x = 1\n").unwrap();
        std::fs::write(dir.join("b.py"), [0xff, 0xfe, 0x00, 0x41]).unwrap();
        let corpus = read_corpus(std::slice::from_ref(&dir), &[]).unwrap();
        assert_eq!(corpus.documents.len(), 1);
        assert_eq!(corpus.skipped, vec![dir.join("b.py")]);
        assert!(corpus.describe_skipped().unwrap().contains("b.py"));
    }

    #[test]
    fn the_python_stdlib_entry_resolves_to_a_directory_with_python_files() {
        let paths = resolve_paths(&[PathBuf::from(PYTHON_STDLIB)]).unwrap();
        assert!(paths[0].join("argparse.py").is_file(), "{paths:?}");
    }

    #[test]
    fn batch_order_is_a_permutation_per_epoch() {
        let blocks = Blocks {
            tokens: vec![vec![0; 3]; 5],
            mask: vec![vec![1.0; 2]; 5],
            seq_len: 2,
        };
        let mut first_epoch: Vec<usize> =
            (0..5).flat_map(|b| blocks.batch_indices(9, b, 1)).collect();
        first_epoch.sort();
        assert_eq!(first_epoch, vec![0, 1, 2, 3, 4]);
        assert_eq!(blocks.batch_indices(9, 3, 2), blocks.batch_indices(9, 3, 2));
        // A batch across the epoch boundary (blocks 3, 4 of epoch 0 and 0 of epoch 1) holds what
        // batches of one would: the order does not depend on the batch size.
        let one_by_one: Vec<usize> = (3..6).flat_map(|b| blocks.batch_indices(9, b, 1)).collect();
        assert_eq!(blocks.batch_indices(9, 1, 3), one_by_one);
        // Two epochs differ in order (seed + epoch).
        let second: Vec<usize> = (5..10)
            .flat_map(|b| blocks.batch_indices(9, b, 1))
            .collect();
        assert_ne!(
            second,
            (0..5)
                .flat_map(|b| blocks.batch_indices(9, b, 1))
                .collect::<Vec<_>>()
        );
    }
}
