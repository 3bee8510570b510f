//! `layerskip eval`: per-exit-layer loss, perplexity, accuracy and agreement with the full model
//! on held-out text, for one or more checkpoints, as a table, JSON and a line plot.

use layerskip_model::LayerSkipBackend;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use layerskip_train::data::{Corpus, Document, read_corpus, split};
use layerskip_train::eval::{ExitReport, exit_quality_with_progress};
use layerskip_train::tokenizer::END_OF_TEXT;
use layerskip_train::{Blocks, TrainConfig};
use serde::Serialize;

use crate::backend::BackendTask;
use crate::infer::{WeightArgs, load_prepared};
use crate::plot::{Series, line_plot};
use crate::progress::Progress;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directories to compare (repeatable); each is evaluated on the same text.
    #[arg(long, required = true)]
    pub model: Vec<PathBuf>,
    #[command(flatten)]
    pub weights: WeightArgs,
    /// A training preset: evaluate on its held-out split (same data, fraction and seed as training).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Text files or directories to evaluate on (all of them; replaces the preset's data).
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// File extensions to read from directories (default: the preset's, or every file).
    #[arg(long)]
    pub extensions: Vec<String>,
    /// Tokens per block (default: the preset's seq_len, or 256).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Evaluate at most this many blocks.
    #[arg(long, default_value_t = 64)]
    pub max_blocks: usize,
    /// Blocks per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Write the reports as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a line plot (loss and agreement per exit layer) here, as SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Serialize)]
struct ModelReport {
    model: PathBuf,
    report: ExitReport,
}

impl EvalArgs {
    /// The documents to evaluate on and the block length.
    fn documents(&self) -> Result<(Vec<Document>, usize)> {
        let preset = self
            .config
            .as_ref()
            .map(|p| TrainConfig::from_file(p))
            .transpose()?;
        let seq_len = self
            .seq_len
            .or(preset.as_ref().map(|c| c.data.seq_len))
            .unwrap_or(256);
        if seq_len == 0 {
            bail!("--seq-len must be at least 1 token");
        }
        let extensions = match (&preset, self.extensions.is_empty()) {
            (Some(c), true) => c.data.extensions.clone(),
            _ => self.extensions.clone(),
        };
        if !self.data.is_empty() {
            return Ok((documents(read_corpus(&self.data, &extensions)?), seq_len));
        }
        let Some(c) = preset else {
            bail!(
                "nothing to evaluate on: give --data PATH or --config PRESET (its held-out split)"
            );
        };
        let docs = documents(read_corpus(&c.data.paths, &extensions)?);
        let (_, held_out) = split(docs, c.data.eval_fraction, c.seed)?;
        Ok((held_out, seq_len))
    }
}

/// The corpus's documents, after saying which files were skipped.
fn documents(corpus: Corpus) -> Vec<Document> {
    if let Some(note) = corpus.describe_skipped() {
        eprintln!("{note}");
    }
    corpus.documents
}

impl BackendTask for EvalArgs {
    fn run<B: LayerSkipBackend>(self, device: B::Device) -> Result<()> {
        for path in self.json.iter().chain(&self.plot) {
            crate::samples::check_output_path(path)?;
        }
        let (docs, seq_len) = self.documents()?;
        // Longer passes take Burn's matmul over the full-precision weights.
        if let (Some(q), Some(most)) = (self.weights.quantize, B::prepared_rows_limit()) {
            let rows = self.batch_size * seq_len;
            if rows > most {
                bail!(
                    "--quantize {q} evaluates through the decoding kernels, which take at most \
                     {most} positions per pass: --batch-size {} x --seq-len {seq_len} = {rows}; \
                     lower them",
                    self.batch_size
                );
            }
        }
        let mut reports = Vec::new();
        for dir in &self.model {
            let (model, tokenizer) = load_prepared::<B>(dir, &device, self.weights.quantize)?;
            let positions = model.config().max_position_embeddings;
            if seq_len > positions {
                bail!(
                    "--seq-len {seq_len} is longer than the context of {} (max_position_embeddings = {positions})",
                    dir.display()
                );
            }
            let eos = tokenizer
                .token_id(END_OF_TEXT)
                .or(model.config().eos_token_ids.first().copied())
                .context("the checkpoint names no eos token to separate documents")?;
            let blocks = Blocks::pack(&docs, &tokenizer, eos, seq_len)?;
            let batches = blocks
                .len()
                .min(self.max_blocks)
                .div_ceil(self.batch_size.max(1));
            let progress = Progress::new(&format!("eval {}: batches", dir.display()), batches);
            let report = exit_quality_with_progress(
                &model,
                &blocks,
                self.batch_size,
                Some(self.max_blocks),
                |_, _| progress.inc(),
            )?;
            progress.finish();
            print_table(dir, &report);
            reports.push(ModelReport {
                model: dir.clone(),
                report,
            });
        }
        if let Some(path) = &self.json {
            std::fs::write(path, serde_json::to_string_pretty(&reports)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &self.plot {
            plot(path, &reports)?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }
}

fn print_table(dir: &std::path::Path, r: &ExitReport) {
    println!(
        "{} ({} blocks, {} tokens)",
        dir.display(),
        r.blocks,
        r.tokens
    );
    println!(
        "{:>5} {:>8} {:>10} {:>9} {:>10}",
        "exit", "loss", "perplexity", "accuracy", "agreement"
    );
    for e in &r.exits {
        println!(
            "{:>5} {:>8.4} {:>10.2} {:>8.1}% {:>9.1}%",
            e.exit_layer,
            e.loss,
            e.perplexity,
            100.0 * e.accuracy,
            100.0 * e.agreement
        );
    }
}

fn label(dir: &std::path::Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

fn plot(path: &std::path::Path, reports: &[ModelReport]) -> Result<()> {
    let series = |f: fn(&layerskip_train::eval::ExitQuality) -> f64| -> Vec<Series> {
        reports
            .iter()
            .map(|m| Series {
                label: label(&m.model),
                points: m
                    .report
                    .exits
                    .iter()
                    .map(|e| (e.exit_layer as f64, f(e)))
                    .collect(),
            })
            .collect()
    };
    line_plot(
        path,
        "exit layer E",
        &[
            ("held-out loss (nats/token)", series(|e| e.loss)),
            (
                "top-1 agreement with the full model",
                series(|e| e.agreement),
            ),
        ],
    )
}
