//! `layerskip`: the command-line front end. Every command is a thin call into the libraries.

use std::path::PathBuf;

mod backend;
mod infer;
mod train;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use layerskip_model::backend::DeviceSpec;
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
        /// Compute device: cpu, cuda, cuda:N, wgpu, vulkan, metal.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
    },
    /// Train with layer dropout and early-exit loss (from scratch or from a checkpoint).
    Train {
        #[command(flatten)]
        args: train::TrainArgs,
        /// Compute device: cpu, cuda, cuda:N, wgpu, vulkan, metal.
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
    },
    /// Convert a GGUF (llama.cpp) Llama checkpoint into a Hugging Face checkpoint directory.
    Convert {
        /// The .gguf file (F32, F16, BF16, Q4_0, Q4_1 and Q8_0 tensors are dequantised).
        #[arg(long)]
        gguf: PathBuf,
        /// Output directory (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        out: PathBuf,
        /// Dtype of the written weights.
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
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

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Infer { args, device } => backend::dispatch(device, args),
        Command::Train { args, device } => backend::dispatch(device, args),
        Command::Convert { gguf, out, dtype } => {
            let report = convert_gguf(&gguf, &out, dtype.into())
                .with_context(|| format!("converting {}", gguf.display()))?;
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
            Ok(())
        }
    }
}
