//! `layerskip train`: LayerSkip training from a TOML preset, from scratch or from a checkpoint.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::backend::Autodiff;
use burn::module::Module;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use layerskip_model::LayerSkipBackend;
use layerskip_model::checkpoint::{read_tokenizer_files, write_atomic};
use layerskip_model::{LlamaConfig, LlamaModel, Tokenizer};
use layerskip_train::data::{Document, read_corpus, split};
use layerskip_train::tokenizer::{END_OF_TEXT, train_bpe};
use layerskip_train::{
    Blocks, ClusterConfig, EvalReport, RunDir, Start, StepReport, TrainConfig, Trainer,
    latest_checkpoint, saved_config,
};

use crate::backend::MultiDeviceTask;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training preset (TOML), e.g. configs/pretrain_from_scratch.toml. With --resume it may be
    /// left out (the checkpoint holds the run's config); if given, it must equal that config
    /// except for `steps`.
    #[arg(long, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Continue from this Hugging Face checkpoint instead of training from scratch.
    #[arg(long, conflicts_with = "resume")]
    pub model: Option<PathBuf>,
    /// Data files or directories (replace the config's `data.paths`).
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// From scratch, with this tokenizer (a tokenizer.json or a directory holding one, e.g.
    /// from `layerskip tokenizer`) instead of one trained on the data: runs that must see the
    /// same tokens (a baseline beside a LayerSkip run) share it.
    #[arg(long, conflicts_with_all = ["model", "resume"])]
    pub tokenizer: Option<PathBuf>,
    /// Output directory for checkpoints; a fresh run refuses one that holds an earlier run.
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
    /// Override the number of steps (with --resume: extend or shorten the run).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Resume from the latest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Delete the checkpoints of an earlier run in --out and start a new one.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Without a terminal, print a line every N steps [default: a twentieth of the run].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub log_every: Option<u64>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Training across several processes (one per node) through burn-collective.
#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// Number of nodes (processes) training together; with a launcher, e.g. torchrun's
    /// `$WORLD_SIZE` or Slurm's `$SLURM_NTASKS`.
    #[arg(long, default_value_t = 1, value_parser = crate::at_least_one)]
    pub nodes: usize,
    /// This node's rank in 0..nodes (`$RANK`, `$SLURM_PROCID`). Rank 0 hosts the coordinator and
    /// writes the checkpoints into --out, which every node must be able to read to resume.
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// HOST:PORT of the coordinator, the same on every node (`$MASTER_ADDR:$MASTER_PORT`).
    #[arg(long)]
    pub coordinator: Option<String>,
    /// HOST:PORT at which the other nodes reach this node [default: this machine's address
    /// towards the coordinator, port = coordinator's + 1 + rank].
    #[arg(long)]
    pub node_address: Option<String>,
    /// Seconds a node waits for the others (to join, and at each step) before it stops with an
    /// error naming the nodes that no longer answer.
    #[arg(long, default_value_t = 300)]
    pub collective_timeout: u64,
}

impl ClusterArgs {
    /// The multi-node settings, or `None` for a single-process run.
    fn config(&self) -> Result<Option<ClusterConfig>> {
        if self.nodes <= 1 && self.node_rank.unwrap_or(0) == 0 && self.coordinator.is_none() {
            return Ok(None);
        }
        let config = ClusterConfig {
            nodes: self.nodes,
            rank: self
                .node_rank
                .context("--node-rank is required with --nodes")?,
            coordinator: self
                .coordinator
                .clone()
                .context("--coordinator HOST:PORT is required with --nodes")?,
            address: self.node_address.clone(),
            timeout: Duration::from_secs(self.collective_timeout),
        };
        config.validate()?;
        Ok(Some(config))
    }
}

impl MultiDeviceTask for TrainArgs {
    fn run<B: LayerSkipBackend>(self, devices: Vec<B::Device>) -> Result<()> {
        train::<Autodiff<B>>(self, devices)
    }
}

/// The run's configuration: the preset with the command line's overrides, or on resume the
/// checkpoint's, which a preset given again must match (a changed config is refused, listing
/// every difference, so nothing changes silently in the middle of a run).
fn run_config(args: &TrainArgs, resume_from: Option<&Path>) -> Result<TrainConfig> {
    let saved = resume_from.map(saved_config).transpose()?;
    let mut config = match (&args.config, &saved) {
        (Some(path), _) => TrainConfig::from_file(path)?,
        (None, Some(saved)) => saved.clone(),
        (None, None) => bail!("--config PRESET is required unless --resume is given"),
    };
    if !args.data.is_empty() {
        config.data.paths = args.data.clone();
    }
    if let Some(saved) = &saved {
        config.steps = saved.steps;
        let changes = saved.differences(&config);
        if !changes.is_empty() {
            bail!(
                "--resume: the run was trained with another config; the checkpoint's value is on \
                 the left: {} (resume with the run's own config, or start a new run)",
                changes.join("; ")
            );
        }
    }
    if let Some(steps) = args.steps {
        config.steps = steps;
    }
    config.validate_basic()?;
    Ok(config)
}

fn train<B: layerskip_train::TrainBackend>(args: TrainArgs, devices: Vec<B::Device>) -> Result<()> {
    let cluster = args.cluster.config()?;
    if cluster.is_some() && devices.len() > 1 {
        bail!(
            "several devices in one process and several nodes do not combine: give each node one --device"
        );
    }
    // Lock, check and (with --overwrite) clear the output directory before any work; in a
    // multi-node run only rank 0 writes it (the others read it to resume).
    let primary = cluster.as_ref().is_none_or(|c| c.rank == 0);
    let run_dir = open_run_dir(&args, primary)?;
    let resume_from = args.resume.then(|| latest_checkpoint(&args.out)).flatten();
    let config = run_config(&args, resume_from.as_deref())?;
    let data = TrainingData::read(&args, &config, resume_from.as_deref())?;
    let extra = data.extra.clone();
    let mut trainer = new_trainer::<B>(
        &args,
        config,
        data,
        resume_from.as_deref(),
        devices[0].clone(),
    )?;
    // Weights (safetensors and Burn record) and AdamW's two moments, all f32.
    if let Some(run_dir) = &run_dir {
        run_dir.check_space(trainer.model().num_params() as u64 * 16 + (1 << 20))?;
    }
    if let Some(cluster) = cluster {
        trainer = join_cluster(trainer, cluster)?;
    }
    if devices.len() > 1 {
        eprintln!(
            "data parallel over {} devices: each step's batch is split into equal shards",
            devices.len()
        );
        trainer = trainer.with_data_parallel(devices)?;
    }
    let extra: Vec<(&str, &[u8])> = extra.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    let out = run_dir.as_ref().map(RunDir::path);
    run_loop(&mut trainer, out, &extra, args.log_every)?;
    trainer.barrier("finishing the run")?;
    Ok(())
}

/// The output directory, locked, checked and (with `--overwrite`) cleared, on the node that
/// writes it (`primary`); on the others, a check that a resumed run finds its checkpoint.
fn open_run_dir(args: &TrainArgs, primary: bool) -> Result<Option<RunDir>> {
    let start = match (args.resume, args.overwrite) {
        (true, _) => Start::Resume,
        (false, true) => Start::Overwrite,
        (false, false) => Start::Fresh,
    };
    let run_dir = primary
        .then(|| RunDir::open(&args.out, start))
        .transpose()?;
    for path in run_dir.iter().flat_map(RunDir::removed) {
        eprintln!("removed {}", path.display());
    }
    if args.resume && !primary && latest_checkpoint(&args.out).is_none() {
        bail!(
            "--resume: no checkpoint in {} on this node (rank 0 writes them: put --out on a file \
             system every node reads, or copy the checkpoint here)",
            args.out.display()
        );
    }
    Ok(run_dir)
}

/// A run's text, tokenized and packed into blocks, with the tokenizer and its files.
struct TrainingData {
    tokenizer: Tokenizer,
    /// The tokenizer files every checkpoint carries.
    extra: TokenizerFiles,
    train: Blocks,
    eval: Blocks,
    /// The token that separates documents.
    eos: u32,
}

impl TrainingData {
    /// Reads the corpus, takes the tokenizer (the checkpoint's, the model's, `--tokenizer`, or
    /// one trained on the data), splits off the held-out documents and packs both parts.
    fn read(args: &TrainArgs, config: &TrainConfig, resume_from: Option<&Path>) -> Result<Self> {
        if config.data.paths.is_empty() {
            bail!(
                "no data: give --data PATH or data.paths in {}",
                args.config
                    .as_deref()
                    .unwrap_or(Path::new("the preset"))
                    .display()
            );
        }
        // A given tokenizer is checked before the data are read.
        let mut given = args
            .tokenizer
            .as_deref()
            .map(|path| given_tokenizer(path, config))
            .transpose()?;
        let corpus = read_corpus(&config.data.paths, &config.data.extensions)?;
        eprintln!(
            "{} documents from {}",
            corpus.documents.len(),
            corpus.describe_sources()
        );
        if let Some(note) = corpus.describe_skipped() {
            eprintln!("{note}");
        }
        let source = resume_from.or(args.model.as_deref());
        let (tokenizer, extra) = match source {
            // Every tokenizer file of the source (its config holds the chat template) goes into
            // each checkpoint.
            Some(dir) => (Tokenizer::from_file(dir)?, read_tokenizer_files(dir)?),
            None if let Some(given) = given.take() => given,
            None => {
                let shape = config
                    .model
                    .as_ref()
                    .context("training from scratch needs a [model] section (or --model DIR)")?;
                eprintln!(
                    "training a {}-token byte-level BPE tokenizer on the data",
                    shape.vocab_size
                );
                let (tokenizer, json) = trained_tokenizer(&corpus.documents, shape.vocab_size)?;
                (tokenizer, vec![("tokenizer.json", json.into_bytes())])
            }
        };
        let (train_docs, eval_docs) =
            split(corpus.documents, config.data.eval_fraction, config.seed)?;
        let eos = match tokenizer.token_id(END_OF_TEXT) {
            Some(id) => id,
            None => *tokenizer_eos(source)?
                .first()
                .context("the checkpoint names no eos_token_id to separate documents")?,
        };
        let train = Blocks::pack(&train_docs, &tokenizer, eos, config.data.seq_len)?;
        let eval = Blocks::pack(&eval_docs, &tokenizer, eos, config.data.seq_len)?;
        eprintln!(
            "{} training and {} held-out blocks of {} tokens",
            train.len(),
            eval.len(),
            config.data.seq_len
        );
        Ok(Self {
            tokenizer,
            extra,
            train,
            eval,
            eos,
        })
    }
}

/// The trainer: resumed from `resume_from`, or a new run from `--model`'s weights (whose shape a
/// preset's `[model]` must match) or from scratch.
fn new_trainer<B: layerskip_train::TrainBackend>(
    args: &TrainArgs,
    config: TrainConfig,
    data: TrainingData,
    resume_from: Option<&Path>,
    device: B::Device,
) -> Result<Trainer<B>> {
    let TrainingData {
        tokenizer,
        train,
        eval,
        eos,
        ..
    } = data;
    Ok(match (resume_from, &args.model) {
        (Some(dir), _) => {
            eprintln!("resuming from {}", dir.display());
            let mut trainer = Trainer::<B>::resume(dir, train, eval, device)?;
            trainer.set_total_steps(config.steps)?;
            trainer
        }
        (None, Some(dir)) => {
            let model = LlamaModel::<B>::from_pretrained(dir, &device)
                .with_context(|| format!("loading {}", dir.display()))?;
            if let Some(shape) = &config.model {
                let differences = shape.differences(model.config());
                if !differences.is_empty() {
                    bail!(
                        "the preset's [model] differs from {}/config.json: {}; training --model \
                         trains the checkpoint's own shape, so remove [model] from the preset \
                         or make it match",
                        dir.display(),
                        differences.join(", ")
                    );
                }
            }
            tokenizer.check_fits(model.config().vocab_size, dir)?;
            Trainer::new(config, model, train, eval, device)?
        }
        (None, None) => {
            let model = scratch_model::<B>(&config, tokenizer.vocab_size(), eos, &device)?;
            Trainer::new(config, model, train, eval, device)?
        }
    })
}

/// `trainer` as one node of a multi-node run.
fn join_cluster<B: layerskip_train::TrainBackend>(
    trainer: Trainer<B>,
    cluster: ClusterConfig,
) -> Result<Trainer<B>> {
    // burn-collective logs every connection at info level (installing its own subscriber when
    // none is set): show its warnings and errors only.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_writer(std::io::stderr)
        .try_init();
    let (rank, nodes) = (cluster.rank, cluster.nodes);
    eprintln!(
        "node {rank} of {nodes}: joining through the coordinator at {}",
        cluster.coordinator
    );
    let trainer = trainer.join_cluster(cluster)?;
    let c = trainer.cluster().expect("joined");
    eprintln!(
        "node {rank} of {nodes}: joined ({}); each step's batch is split into {nodes} shards",
        c.addresses().join(", ")
    );
    Ok(trainer)
}

/// The byte-level BPE of `vocab_size` tokens trained on `docs`, and its tokenizer.json text:
/// what a from-scratch run and `layerskip tokenizer` both train.
fn trained_tokenizer(docs: &[Document], vocab_size: usize) -> Result<(Tokenizer, String)> {
    let tokenizer = train_bpe(docs, vocab_size)?;
    let json = tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    Ok((tokenizer, json))
}

/// Tokenizer files (name, bytes) that every checkpoint of a run carries.
type TokenizerFiles = Vec<(&'static str, Vec<u8>)>;

/// The tokenizer of `--tokenizer` (a file or a directory holding tokenizer.json) and the files
/// every checkpoint carries with it; an error if it has more tokens than the preset's model.
fn given_tokenizer(path: &Path, config: &TrainConfig) -> Result<(Tokenizer, TokenizerFiles)> {
    let tokenizer =
        Tokenizer::from_file(path).with_context(|| format!("--tokenizer {}", path.display()))?;
    let files = if path.is_dir() {
        read_tokenizer_files(path)?
    } else {
        vec![("tokenizer.json", std::fs::read(path)?)]
    };
    if let Some(shape) = &config.model
        && tokenizer.vocab_size() > shape.vocab_size
    {
        bail!(
            "--tokenizer {} has {} tokens, more than the preset's model.vocab_size {}",
            path.display(),
            tokenizer.vocab_size(),
            shape.vocab_size
        );
    }
    Ok((tokenizer, files))
}

/// `layerskip tokenizer`: the byte-level BPE a from-scratch run would train, on the preset's data.
#[derive(Args, Debug)]
pub struct TokenizerArgs {
    /// Training preset (TOML): its `data` section and `model.vocab_size`.
    #[arg(long)]
    pub config: PathBuf,
    /// Data files or directories (replace the config's `data.paths`).
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// Directory to write tokenizer.json into (created; an existing tokenizer.json is refused).
    #[arg(long)]
    pub out: PathBuf,
}

/// Trains the tokenizer of [`TokenizerArgs`] on the preset's documents, as a from-scratch run
/// does, and writes it atomically.
pub fn tokenizer(args: TokenizerArgs) -> Result<()> {
    let mut config = TrainConfig::from_file(&args.config)?;
    if !args.data.is_empty() {
        config.data.paths = args.data;
    }
    let shape = config
        .model
        .as_ref()
        .context("the preset has no [model] section to take vocab_size from")?;
    let target = args.out.join("tokenizer.json");
    if target.exists() {
        bail!(
            "{} exists; give another --out (nothing was overwritten)",
            target.display()
        );
    }
    let corpus = read_corpus(&config.data.paths, &config.data.extensions)?;
    eprintln!(
        "{} documents from {}",
        corpus.documents.len(),
        corpus.describe_sources()
    );
    if corpus.documents.iter().all(|d| d.text.trim().is_empty()) {
        bail!(
            "no text to train a tokenizer on in {} (train refuses the same data)",
            corpus.describe_sources()
        );
    }
    let (tokenizer, json) = trained_tokenizer(&corpus.documents, shape.vocab_size)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    write_atomic(&target, json.as_bytes())?;
    eprintln!(
        "wrote {} ({} tokens)",
        target.display(),
        tokenizer.vocab_size()
    );
    Ok(())
}

fn tokenizer_eos(dir: Option<&Path>) -> Result<Vec<u32>> {
    let dir = dir.context("no model")?;
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
    let llama = s.llama_config(vocab, vec![eos]);
    B::seed(device, config.seed);
    Ok(LlamaModel::init(&llama, device)?)
}

/// Trains to the last step, evaluating and saving on the config's schedule. `out` is `None` on
/// the nodes of a multi-node run that do not write checkpoints (they train and stay quiet).
fn run_loop<B: layerskip_train::TrainBackend>(
    trainer: &mut Trainer<B>,
    out: Option<&Path>,
    extra: &[(&str, &[u8])],
    log_every: Option<u64>,
) -> Result<()> {
    let total = trainer.config().steps as u64;
    let tty = std::io::stderr().is_terminal() && out.is_some();
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
    let log_every = log_every.unwrap_or((total / 20).max(1)) as usize;
    let start = Instant::now();
    let mut tokens = 0usize;
    let held_out = trainer.has_held_out();
    if trainer.step_count() == 0 && held_out {
        let eval = trainer.evaluate()?;
        if out.is_some() {
            report_eval(&bar, &eval);
        }
    }
    while !trainer.finished() {
        let r = trainer.train_step()?;
        tokens += r.tokens;
        let msg = step_message(&r, tokens as f64 / start.elapsed().as_secs_f64());
        bar.set_message(msg.clone());
        bar.inc(1);
        let step = trainer.step_count();
        if !tty && out.is_some() && (step.is_multiple_of(log_every) || step == 1) {
            eprintln!("step {step}/{total} {msg}");
        }
        let (eval_every, save_every) = (trainer.config().eval_every, trainer.config().save_every);
        if held_out && eval_every > 0 && step.is_multiple_of(eval_every) && !trainer.finished() {
            let eval = trainer.evaluate()?;
            if out.is_some() {
                report_eval(&bar, &eval);
            }
        }
        if let Some(out) = out
            && save_every > 0
            && step.is_multiple_of(save_every)
            && !trainer.finished()
        {
            let dir = trainer.save_checkpoint(out, extra)?;
            bar.suspend(|| eprintln!("saved {}", dir.display()));
        }
    }
    bar.finish_and_clear();
    if held_out {
        let eval = trainer.evaluate()?;
        if out.is_some() {
            report_eval(&bar, &eval);
        }
    }
    let Some(out) = out else {
        eprintln!(
            "node {} finished ({:.0} s)",
            trainer.cluster().map_or(0, |c| c.rank()),
            start.elapsed().as_secs_f64()
        );
        return Ok(());
    };
    let dir = trainer.save_checkpoint(out, extra)?;
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
        .map(|(l, _, ce)| format!("{}={ce:.3}", l + 1))
        .collect();
    format!(
        "loss {:.4} lr {:.2e} skipped {:.0}% {:.0} tok/s loss at exit [{}]",
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
        .map(|(l, v)| format!("exit {}: {v:.3} (ppl {:.1})", l + 1, v.exp()))
        .collect();
    bar.suspend(|| eprintln!("eval @ step {}: {}", e.step, cells.join(", ")));
}
