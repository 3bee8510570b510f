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

use crate::error::{Result, TrainError};

/// One document: an optional prompt (no loss) and the text the model learns.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Context without loss (JSONL `prompt`).
    pub prompt: Option<String>,
    /// Text with loss (`text`, `response`, or a whole file).
    pub text: String,
}

/// Reads documents from files and directories (recursively, sorted). `.jsonl` files give one
/// document per line; other files are one document each. In directories only files whose
/// extension is in `extensions` are read (all files when empty).
pub fn read_documents(paths: &[PathBuf], extensions: &[String]) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for file in list_files(paths, extensions)? {
        let io = |e: std::io::Error| TrainError::File {
            path: file.clone(),
            message: e.to_string(),
        };
        let bytes = std::fs::read(&file).map_err(io)?;
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        }; // binary or non-UTF-8: skip
        if file.extension().is_some_and(|e| e == "jsonl") {
            for (n, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                docs.push(parse_jsonl_line(line).map_err(|m| TrainError::File {
                    path: file.clone(),
                    message: format!("line {}: {m}", n + 1),
                })?);
            }
        } else if !text.trim().is_empty() {
            docs.push(Document { prompt: None, text });
        }
    }
    Ok(docs)
}

/// The files under `paths` (recursively, sorted; directories filtered by `extensions`).
pub fn list_files(paths: &[PathBuf], extensions: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        collect_files(path, extensions, &mut files)?;
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
        let mut stream: Vec<u32> = Vec::new();
        let mut loss: Vec<f32> = Vec::new();
        for doc in docs {
            if let Some(p) = &doc.prompt {
                let ids = tokenizer.encode(p)?;
                loss.extend(std::iter::repeat_n(0.0, ids.len()));
                stream.extend(ids);
            }
            let ids = tokenizer.encode(&doc.text)?;
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
        (0..batch_size)
            .map(|i| {
                let global = batch * batch_size + i;
                let (epoch, pos) = (global / n, global % n);
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                    seed.wrapping_add(epoch as u64),
                ));
                order[pos]
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

/// Splits documents into (train, held-out) after a seeded shuffle; at least one document each.
pub fn split(
    mut docs: Vec<Document>,
    eval_fraction: f64,
    seed: u64,
) -> Result<(Vec<Document>, Vec<Document>)> {
    if docs.len() < 2 {
        return Err(TrainError::Data(format!(
            "need at least 2 documents to hold some out, found {}",
            docs.len()
        )));
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
    }
}
