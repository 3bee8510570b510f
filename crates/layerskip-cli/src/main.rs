//! `layerskip`: the command-line front end. Every command is a thin call into the libraries.

use std::path::PathBuf;

mod backend;
mod bench;
mod environment;
mod eval;
#[cfg(feature = "cube")]
mod gpu;
mod infer;
mod plot;
mod progress;
mod samples;
mod serve;
mod sweep;
mod train;

use anyhow::{Context, Result, bail};
use backend::DeviceSpec;
use clap::{Parser, Subcommand, ValueEnum};
use layerskip_model::Quantization;
use layerskip_model::backend::Precision;
use layerskip_model::{SaveDtype, convert_gguf};

#[derive(Parser)]
#[command(
    name = "layerskip",
    version,
    about = "Train and serve LLMs with LayerSkip (early exit + self-speculative decoding)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text: autoregressive, early exit, or self-speculative decoding.
    Infer {
        #[command(flatten)]
        args: infer::InferArgs,
        #[command(flatten)]
        device: backend::DeviceArgs,
    },
    /// Train with layer dropout and early-exit loss (from scratch or from a checkpoint).
    Train {
        #[command(flatten)]
        args: train::TrainArgs,
        /// Compute device: cpu, cuda, cuda:N, wgpu, vulkan, metal. Several devices of one
        /// backend, comma-separated (`cuda:0,cuda:1`), train data-parallel.
        #[arg(long, default_value = "cpu", value_delimiter = ',')]
        device: Vec<DeviceSpec>,
    },
    /// Train the byte-level BPE tokenizer a from-scratch run would train, on a preset's data
    /// (for `train --tokenizer`: runs that must see the same tokens share one).
    Tokenizer {
        #[command(flatten)]
        args: train::TokenizerArgs,
    },
    /// Per-exit-layer loss, perplexity and agreement with the full model on held-out text.
    Eval {
        #[command(flatten)]
        args: eval::EvalArgs,
        #[command(flatten)]
        device: backend::DeviceArgs,
    },
    /// Benchmark a strategy against autoregressive decoding on a dataset (speed, acceptance,
    /// memory, quality).
    ///
    /// Figures: ms/tok = decode time per generated token after the first (pooled over prompts);
    /// speedup = AR's ms/tok / the strategy's ms/tok; tok/s = generated tokens / wall time with
    /// the first token's time included; ttft = time to the first token (prefill + first step).
    Bench {
        #[command(flatten)]
        args: bench::BenchArgs,
        #[command(flatten)]
        device: backend::DeviceArgs,
    },
    /// Benchmark self-speculation over an exit-layer x speculations grid (CSV, heatmaps).
    ///
    /// Each point's speedup = the ms/token after the first token of AR runs measured beside it /
    /// the point's; "best" is the point with the highest speedup. tokens_per_second in the CSV
    /// includes the time to the first token.
    Sweep {
        #[command(flatten)]
        args: sweep::SweepArgs,
        #[command(flatten)]
        device: backend::DeviceArgs,
    },
    /// Serve the model over HTTP with OpenAI's API (completions, chat, streaming, metrics).
    Serve {
        #[command(flatten)]
        args: serve::ServeArgs,
        #[command(flatten)]
        device: backend::DeviceArgs,
    },
    /// Check that greedy self-speculative decoding reproduces autoregressive decoding.
    Correctness {
        #[command(flatten)]
        args: bench::CorrectnessArgs,
        #[command(flatten)]
        device: backend::DeviceArgs,
    },
    /// Convert a GGUF (llama.cpp) Llama checkpoint, or re-save a checkpoint directory in another
    /// dtype (e.g. a training checkpoint as a bf16 release), as a Hugging Face checkpoint directory.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["gguf", "checkpoint"])))]
    Convert {
        /// The .gguf file (F32, F16, BF16, Q4_0, Q4_1 and Q8_0 tensors are dequantised).
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// A Hugging Face checkpoint directory to re-save (weights, config, tokenizer files).
        /// Several (`--checkpoint A B C`, e.g. a run's last checkpoints): their weights are
        /// averaged, element by element (same configuration and tokenizer files required).
        #[arg(long, num_args = 1..)]
        checkpoint: Vec<PathBuf>,
        /// Output directory (config.json, model.safetensors, tokenizer.json): a new or empty
        /// directory; it appears when the model is complete.
        #[arg(long)]
        out: PathBuf,
        /// Dtype of the written weights.
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
        /// Replace an `--out` that holds files, as a whole (none of its files are kept beside
        /// the new model's).
        #[arg(long)]
        overwrite: bool,
        /// With `--checkpoint`: renumber the vocabulary by how often each token occurs in the
        /// files under these paths (most frequent first; the tokenizer's special tokens keep
        /// their ids), so that `--draft-vocab N` drafts over the N most frequent tokens. The
        /// model computes the same text.
        #[arg(long, num_args = 1.., requires = "checkpoint")]
        sort_vocab: Vec<PathBuf>,
        /// File extensions read under `--sort-vocab` directories.
        #[arg(long, value_delimiter = ',', default_value = "py")]
        sort_vocab_ext: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl From<Dtype> for SaveDtype {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => SaveDtype::F32,
            Dtype::F16 => SaveDtype::F16,
            Dtype::Bf16 => SaveDtype::Bf16,
        }
    }
}

/// A string argument that may not be empty (clap value parser).
pub(crate) fn non_empty(s: &str) -> std::result::Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_string())
    }
}

/// A count of at least one (clap value parser).
pub(crate) fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn main() {
    // Like other Unix tools, end quietly when the reader of stdout goes away (`| head`): Rust
    // ignores SIGPIPE, which turns every later print into a panic.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of a signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // `print!` panics when stdout cannot be written (a full disk, /dev/full): that is an
    // ordinary error of this run, reported in one line with a non-zero exit, not a panic.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied());
        if let Some(m) = message.filter(|m| m.starts_with("failed printing to std")) {
            eprintln!("error: {m}");
            std::process::exit(1);
        }
        default_hook(info);
    }));
    let cli = Cli::parse();
    if let Err(err) = environment::configure().and_then(|()| run(cli)) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Infer { args, device } => backend::dispatch(device.device, device.precision, args),
        Command::Train { args, device } => backend::dispatch_many(&device, Precision::F32, args),
        Command::Tokenizer { args } => train::tokenizer(args),
        Command::Eval { args, device } => backend::dispatch(device.device, device.precision, args),
        Command::Bench { args, device } => backend::dispatch(device.device, device.precision, args),
        Command::Sweep { args, device } => backend::dispatch(device.device, device.precision, args),
        Command::Serve { args, device } => {
            let args = args.with_default_engines(device.device);
            backend::dispatch(device.device, device.precision, args)
        }
        Command::Correctness { args, device } => {
            backend::dispatch(device.device, device.precision, args)
        }
        Command::Convert {
            checkpoint: dirs,
            out,
            dtype,
            overwrite,
            sort_vocab,
            sort_vocab_ext,
            ..
        } if !dirs.is_empty() => write_model_dir(&out, overwrite, |stage| {
            backend::dispatch(
                DeviceSpec::Cpu,
                Precision::F32,
                Resave {
                    dirs,
                    out: stage.to_path_buf(),
                    shown: out.clone(),
                    dtype: dtype.into(),
                    sort_vocab: (!sort_vocab.is_empty()).then_some((sort_vocab, sort_vocab_ext)),
                },
            )
        }),
        Command::Convert {
            gguf: Some(gguf),
            out,
            dtype,
            overwrite,
            ..
        } => {
            let report = write_model_dir(&out, overwrite, |stage| {
                convert_gguf(&gguf, stage, dtype.into())
                    .with_context(|| format!("converting {}", gguf.display()))
            })?;
            let c = &report.config;
            println!(
                "wrote {}: {} tensors, {} layers, hidden {}, heads {}/{}, vocab {}, tied head: {}, tokenizer: {}",
                out.display(),
                report.tensors,
                c.num_layers,
                c.hidden_size,
                c.num_heads,
                c.num_kv_heads,
                c.vocab_size,
                c.tie_word_embeddings,
                report.tokenizer
            );
            match report.quantized {
                Some(q @ (Quantization::Q8_0 | Quantization::Q4_0)) => println!(
                    "its layer weights were {q} blocks, written dequantised; decode with \
                     `--quantize {q}` to compute with the file's own numbers in {q} memory"
                ),
                Some(q) => println!(
                    "its layer weights were {q} blocks, written dequantised (`--quantize {q}` \
                     quantizes them again with ggml's reference quantizer, which does not \
                     reproduce this file's blocks)"
                ),
                None => {}
            }
            Ok(())
        }
        Command::Convert { .. } => unreachable!("clap requires --gguf or --checkpoint"),
    }
}

/// Writes a model directory at `out` as a whole: `write` fills a new hidden sibling directory,
/// which is renamed to `out` once complete, so that `out` never holds a half-written model nor two
/// models' files. An `out` holding anything is refused unless `overwrite`, which replaces it.
fn write_model_dir<T>(
    out: &std::path::Path,
    overwrite: bool,
    write: impl FnOnce(&std::path::Path) -> Result<T>,
) -> Result<T> {
    let mut held: Vec<String> = match std::fs::read_dir(out) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect(),
        Err(_) if out.exists() && !out.is_dir() => {
            bail!("{}: exists and is not a directory", out.display())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading --out {}", out.display())),
    };
    if !held.is_empty() && !overwrite {
        held.sort();
        let shown = held.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        let more = if held.len() > 5 { ", ..." } else { "" };
        bail!(
            "--out {} already holds files ({shown}{more}); writing a model there would mix two \
             models' files: choose a new or empty directory, or pass --overwrite to replace it \
             as a whole",
            out.display()
        );
    }
    let name = out
        .file_name()
        .with_context(|| format!("--out {} names no directory", out.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let pid = std::process::id();
    let stage = parent.join(format!(".{name}.partial-{pid}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    std::fs::create_dir(&stage).with_context(|| format!("creating {}", stage.display()))?;
    let written = match write(&stage) {
        Ok(written) => written,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&stage);
            return Err(e);
        }
    };
    let rename = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::rename(from, to)
            .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
    };
    if out.exists() {
        // The old directory steps aside before the new one takes its name, then goes.
        let old = parent.join(format!(".{name}.replaced-{pid}"));
        rename(out, &old)?;
        if let Err(e) = rename(&stage, out) {
            let _ = rename(&old, out);
            return Err(e);
        }
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        rename(&stage, out)?;
    }
    std::fs::File::open(&parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", parent.display()))?;
    Ok(written)
}

/// Re-saves a checkpoint directory in another dtype, with its tokenizer files.
struct Resave {
    /// One checkpoint, or several whose weights are averaged.
    dirs: Vec<PathBuf>,
    /// Where the files are written.
    out: PathBuf,
    /// The directory they will be in when complete (for the message).
    shown: PathBuf,
    dtype: SaveDtype,
    /// Data (paths, extensions) to renumber the vocabulary by ([`vocab_order`]).
    sort_vocab: Option<(Vec<PathBuf>, Vec<String>)>,
}

impl backend::BackendTask for Resave {
    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Result<()> {
        let mut models = Vec::with_capacity(self.dirs.len());
        let mut files = Vec::new();
        for (i, dir) in self.dirs.iter().enumerate() {
            models.push(
                layerskip_model::LlamaModel::<B>::from_pretrained(dir, &device)
                    .with_context(|| format!("loading {}", dir.display()))?,
            );
            let these = layerskip_model::checkpoint::read_tokenizer_files(dir)?;
            if i == 0 {
                files = these;
            } else if these != files {
                bail!(
                    "{} and {} have different tokenizer files: only checkpoints of one model \
                     can be averaged",
                    self.dirs[0].display(),
                    dir.display()
                );
            }
        }
        let averaged = models.len();
        let mut model = layerskip_model::LlamaModel::average(models).with_context(|| {
            format!("averaging {averaged} checkpoints (they must be of one model)")
        })?;
        let dir = &self.dirs[0];
        if let Some((paths, extensions)) = &self.sort_vocab {
            let Some((_, tokenizer)) = files.iter_mut().find(|(n, _)| *n == "tokenizer.json")
            else {
                bail!("{} has no tokenizer.json to renumber", dir.display());
            };
            let vocab = model.config().vocab_size;
            let (old_ids, renumbered, report) = vocab_order(tokenizer, vocab, paths, extensions)?;
            model = model.reorder_vocab(&old_ids)?;
            *tokenizer = renumbered;
            println!("{report}");
        }
        model.save_pretrained(&self.out, self.dtype)?;
        let mut copied = Vec::new();
        for (name, bytes) in files {
            layerskip_model::checkpoint::write_atomic(&self.out.join(name), &bytes)?;
            copied.push(name);
        }
        let source = if averaged > 1 {
            format!("; the mean of {averaged} checkpoints' weights")
        } else {
            String::new()
        };
        println!(
            "wrote {} ({} layers, {:?} weights{source}; copied {})",
            self.shown.display(),
            model.num_layers(),
            self.dtype,
            copied.join(", ")
        );
        Ok(())
    }
}

/// The vocabulary renumbered by frequency in the files under `paths`: for each new id the old
/// one (the tokenizer's added tokens keep theirs; ids the tokenizer never produces go last),
/// `tokenizer_json` with its vocabulary renumbered, and a line saying what was counted.
fn vocab_order(
    tokenizer_json: &[u8],
    vocab: usize,
    paths: &[PathBuf],
    extensions: &[String],
) -> Result<(Vec<usize>, Vec<u8>, String)> {
    let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json)
        .map_err(|e| anyhow::anyhow!("tokenizer.json: {e}"))?;
    let docs = layerskip_train::data::read_documents(paths, extensions)?;
    if docs.is_empty() {
        bail!("no documents under the --sort-vocab paths to count tokens in");
    }
    let mut counts = vec![0u64; vocab];
    let mut total = 0u64;
    for chunk in docs.chunks(256) {
        let texts: Vec<&str> = chunk.iter().map(|d| d.text.as_str()).collect();
        let encodings = tokenizer
            .encode_batch(texts, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        for id in encodings.iter().flat_map(|e| e.get_ids()) {
            let id = *id as usize;
            if id >= vocab {
                bail!("the tokenizer produced id {id}, past the model's vocab_size {vocab}");
            }
            counts[id] += 1;
            total += 1;
        }
    }
    let fixed: std::collections::BTreeSet<usize> = tokenizer
        .get_added_tokens_decoder()
        .keys()
        .map(|&id| id as usize)
        .filter(|&id| id < vocab)
        .collect();
    let mut movable: Vec<usize> = (0..vocab).filter(|id| !fixed.contains(id)).collect();
    movable.sort_by_key(|&id| (std::cmp::Reverse(counts[id]), id));
    let mut movable = movable.into_iter();
    let old_ids: Vec<usize> = (0..vocab)
        .map(|new| {
            if fixed.contains(&new) {
                new
            } else {
                movable.next().expect("as many movable ids as places")
            }
        })
        .collect();
    let mut new_of = vec![0usize; vocab];
    for (new, &old) in old_ids.iter().enumerate() {
        new_of[old] = new;
    }
    let mut json: serde_json::Value = serde_json::from_slice(tokenizer_json)?;
    let Some(map) = json["model"]["vocab"].as_object_mut() else {
        bail!("tokenizer.json has no model.vocab map to renumber");
    };
    for id in map.values_mut() {
        let old = id.as_u64().context("a vocab id that is not a number")? as usize;
        if old < vocab && !fixed.contains(&old) {
            *id = serde_json::json!(new_of[old]);
        }
    }
    let covered = |n: usize| -> f64 {
        let inside: u64 = old_ids[..n.min(vocab)].iter().map(|&id| counts[id]).sum();
        100.0 * inside as f64 / total.max(1) as f64
    };
    let report = format!(
        "vocabulary renumbered by frequency over {} documents ({total} tokens): ids 0..1024 / 0..2048 / 0..4096 now cover {:.1}% / {:.1}% / {:.1}% of them",
        docs.len(),
        covered(1024),
        covered(2048),
        covered(4096)
    );
    Ok((old_ids, serde_json::to_vec(&json)?, report))
}
