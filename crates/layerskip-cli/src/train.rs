//! `layerskip train`: LayerSkip training from a TOML preset, from scratch or from a checkpoint.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::backend::Autodiff;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use layerskip_model::LayerSkipBackend;
use layerskip_model::{LlamaConfig, LlamaModel, RopeConfig, Tokenizer};
use layerskip_train::data::{list_files, read_documents, split};
use layerskip_train::tokenizer::{END_OF_TEXT, train_bpe};
use layerskip_train::{Blocks, EvalReport, StepReport, TrainConfig, Trainer, latest_checkpoint};

use crate::backend::MultiDeviceTask;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training preset (TOML), e.g. configs/pretrain_from_scratch.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from this Hugging Face checkpoint instead of training from scratch.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Data files or directories (replace the config's `data.paths`).
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// Output directory for checkpoints.
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
    /// Override the number of steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Resume from the latest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
}

impl MultiDeviceTask for TrainArgs {
    fn run<B: LayerSkipBackend>(self, devices: Vec<B::Device>) -> Result<()> {
        train::<Autodiff<B>>(self, devices)
    }
}

fn train<B: layerskip_train::TrainBackend>(args: TrainArgs, devices: Vec<B::Device>) -> Result<()> {
    let device = devices[0].clone();
    let mut config = TrainConfig::from_file(&args.config)?;
    if let Some(steps) = args.steps {
        config.steps = steps;
    }
    if !args.data.is_empty() {
        config.data.paths = args.data.clone();
    }
    config.validate_basic()?;
    if config.data.paths.is_empty() {
        bail!(
            "no data: give --data PATH or data.paths in {}",
            args.config.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let resume_from = if args.resume {
        Some(
            latest_checkpoint(&args.out)
                .with_context(|| format!("--resume: no checkpoint in {}", args.out.display()))?,
        )
    } else {
        None
    };
    // The tokenizer: the checkpoint's, the model's, or one trained on the data.
    let tokenizer = match (&resume_from, &args.model) {
        (Some(dir), _) | (None, Some(dir)) => Tokenizer::from_file(dir)?,
        (None, None) => {
            let shape = config
                .model
                .as_ref()
                .context("training from scratch needs a [model] section (or --model DIR)")?;
            eprintln!(
                "training a {}-token byte-level BPE tokenizer on the data",
                shape.vocab_size
            );
            train_bpe(
                &list_files(&config.data.paths, &config.data.extensions)?,
                shape.vocab_size,
            )?
        }
    };
    let tokenizer_json = tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let docs = read_documents(&config.data.paths, &config.data.extensions)?;
    eprintln!("{} documents from {:?}", docs.len(), config.data.paths);
    let (train_docs, eval_docs) = split(docs, config.data.eval_fraction, config.seed)?;
    let eos = match tokenizer.token_id(END_OF_TEXT) {
        Some(id) => id,
        None => *tokenizer_eos(&args)?
            .first()
            .context("the checkpoint names no eos_token_id to separate documents")?,
    };
    let train_blocks = Blocks::pack(&train_docs, &tokenizer, eos, config.data.seq_len)?;
    let eval_blocks = Blocks::pack(&eval_docs, &tokenizer, eos, config.data.seq_len)?;
    eprintln!(
        "{} training and {} held-out blocks of {} tokens",
        train_blocks.len(),
        eval_blocks.len(),
        config.data.seq_len
    );
    let mut trainer = match (&resume_from, &args.model) {
        (Some(dir), _) => {
            eprintln!("resuming from {}", dir.display());
            let mut trainer = Trainer::<B>::resume(dir, train_blocks, eval_blocks, device)?;
            if let Some(steps) = args.steps {
                trainer.set_total_steps(steps)?;
            }
            trainer
        }
        (None, Some(dir)) => {
            let model = LlamaModel::<B>::from_pretrained(dir, &device)?;
            Trainer::new(config, model, train_blocks, eval_blocks, device)?
        }
        (None, None) => {
            let model = scratch_model::<B>(&config, tokenizer.vocab_size(), eos, &device)?;
            Trainer::new(config, model, train_blocks, eval_blocks, device)?
        }
    };
    if devices.len() > 1 {
        eprintln!(
            "data parallel over {} devices: each step's batch is split into equal shards",
            devices.len()
        );
        trainer = trainer.with_data_parallel(devices)?;
    }
    run_loop(&mut trainer, &args, tokenizer_json.as_bytes())
}

fn tokenizer_eos(args: &TrainArgs) -> Result<Vec<u32>> {
    let dir = args.model.as_ref().context("no model")?;
    Ok(LlamaConfig::from_hf_file(&dir.join("config.json"))?.eos_token_ids)
}

fn scratch_model<B: LayerSkipBackend>(
    config: &TrainConfig,
    vocab: usize,
    eos: u32,
    device: &B::Device,
) -> Result<LlamaModel<B>> {
    let s = config
        .model
        .as_ref()
        .context("training from scratch needs a [model] section")?;
    if s.num_heads == 0 || s.hidden_size % s.num_heads != 0 {
        bail!(
            "model.hidden_size ({}) must be a multiple of model.num_heads ({})",
            s.hidden_size,
            s.num_heads
        );
    }
    let llama = LlamaConfig {
        vocab_size: vocab,
        hidden_size: s.hidden_size,
        intermediate_size: s.intermediate_size,
        num_layers: s.num_layers,
        num_heads: s.num_heads,
        num_kv_heads: s.num_kv_heads,
        head_dim: s.hidden_size / s.num_heads,
        max_position_embeddings: s.max_position_embeddings,
        rms_norm_eps: 1e-5,
        rope: RopeConfig {
            theta: s.rope_theta,
            llama3_scaling: None,
        },
        tie_word_embeddings: s.tie_word_embeddings,
        bos_token_id: None,
        eos_token_ids: vec![eos],
    };
    B::seed(device, config.seed);
    Ok(LlamaModel::init(&llama, device)?)
}

fn run_loop<B: layerskip_train::TrainBackend>(
    trainer: &mut Trainer<B>,
    args: &TrainArgs,
    tokenizer: &[u8],
) -> Result<()> {
    let total = trainer.config().steps as u64;
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
            .expect("valid template"),
    );
    bar.set_position(trainer.step_count() as u64);
    let log_every = (total / 20).max(1) as usize;
    let start = Instant::now();
    let mut tokens = 0usize;
    let extra = [("tokenizer.json", tokenizer)];
    if trainer.step_count() == 0 {
        report_eval(&bar, &trainer.evaluate()?);
    }
    while !trainer.finished() {
        let r = trainer.train_step()?;
        tokens += r.tokens;
        let msg = step_message(&r, tokens as f64 / start.elapsed().as_secs_f64());
        bar.set_message(msg.clone());
        bar.inc(1);
        let step = trainer.step_count();
        if !tty && (step.is_multiple_of(log_every) || step == 1) {
            eprintln!("step {step}/{total} {msg}");
        }
        let (eval_every, save_every) = (trainer.config().eval_every, trainer.config().save_every);
        if eval_every > 0 && step.is_multiple_of(eval_every) && !trainer.finished() {
            report_eval(&bar, &trainer.evaluate()?);
        }
        if save_every > 0 && step.is_multiple_of(save_every) && !trainer.finished() {
            let dir = trainer.save_checkpoint(&args.out, &extra)?;
            bar.suspend(|| eprintln!("saved {}", dir.display()));
        }
    }
    bar.finish_and_clear();
    report_eval(&bar, &trainer.evaluate()?);
    let dir = trainer.save_checkpoint(&args.out, &extra)?;
    eprintln!(
        "saved {} ({:.0} s, {:.0} tokens/s)",
        dir.display(),
        start.elapsed().as_secs_f64(),
        tokens as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step_message(r: &StepReport, tokens_per_s: f64) -> String {
    let exits: Vec<String> = r
        .per_layer
        .iter()
        .map(|(l, _, ce)| format!("L{l}={ce:.3}"))
        .collect();
    format!(
        "loss {:.4} lr {:.2e} skipped {:.0}% {:.0} tok/s exits [{}]",
        r.loss,
        r.lr,
        100.0 * r.skipped_fraction,
        tokens_per_s,
        exits.join(" ")
    )
}

fn report_eval(bar: &ProgressBar, e: &EvalReport) {
    let cells: Vec<String> = e
        .loss
        .iter()
        .enumerate()
        .map(|(l, v)| format!("L{l}: {v:.3} (ppl {:.1})", v.exp()))
        .collect();
    bar.suspend(|| eprintln!("eval @ step {}: {}", e.step, cells.join(", ")));
}
