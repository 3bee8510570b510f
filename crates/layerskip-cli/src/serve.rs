//! `layerskip serve`: the OpenAI-compatible server (crate `layerskip-serve`) on one model.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use burn::module::Module;
use clap::Args;
use layerskip_infer::{ChatTemplate, GenerateOptions};
use layerskip_model::LayerSkipBackend;
use layerskip_serve::{AppState, Metrics};

use crate::backend::{BackendTask, DeviceSpec};
use crate::infer::{StrategyArgs, WeightArgs, load_for_decoding, model_dir};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Hugging Face checkpoint directory (default: the model shipped in models/default).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub weights: WeightArgs,
    /// Address to listen on: localhost by default; 0.0.0.0 opens the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The strategy of requests that name none (a request's "layerskip" field overrides it).
    #[command(flatten)]
    pub strategy: StrategyArgs,
    /// Context positions per request (prompt + generation); default
    /// min(max_position_embeddings, 4096).
    #[arg(long)]
    pub context: Option<usize>,
    /// The id clients name the model by (default: the model directory's name).
    #[arg(long, value_parser = crate::non_empty)]
    pub model_id: Option<String>,
    /// Engines: threads that generate at the same time, each with its own KV caches over the
    /// same weights (and each batching its autoregressive requests, see --batch). Default: on
    /// the CPU, one per core (at most 8) for a model of at most 32M parameters, whose decoding
    /// is bound by arithmetic, and 1 for larger ones, whose decoding is bound by reading the
    /// weights, which a batch reads once for all its requests; 1 on a GPU.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub engines: Option<u16>,
    /// Autoregressive requests an engine decodes together, one pass through the model per
    /// step for all of them (1: one request at a time). Requests that use self-speculation or
    /// early exit run one at a time on an engine, after its batch has drained.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub batch: u16,
    /// Largest request body accepted, in bytes (larger ones get 413).
    #[arg(long, default_value_t = 1 << 20, value_parser = crate::at_least_one)]
    pub max_body_bytes: usize,
}

/// Models up to this many parameters get one engine per core on the CPU by default.
const SMALL_MODEL_PARAMS: usize = 32_000_000;

impl ServeArgs {
    /// `--engines` on a GPU defaults to 1; on the CPU it depends on the model (see
    /// [`ServeArgs::engines_for`]).
    pub fn with_default_engines(mut self, device: DeviceSpec) -> Self {
        if !matches!(device, DeviceSpec::Cpu) {
            self.engines = self.engines.or(Some(1));
        }
        self
    }

    /// `--engines`, else the CPU default for a model of `params` parameters.
    fn engines_for(&self, params: usize) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        match self.engines {
            Some(n) => n as usize,
            None if params <= SMALL_MODEL_PARAMS => cores.min(8),
            None => 1,
        }
    }
}

impl BackendTask for ServeArgs {
    fn run<B: LayerSkipBackend>(self, device: B::Device) -> Result<()> {
        let dir = model_dir(&self.model)?;
        let (model, tokenizer) = load_for_decoding::<B>(&dir, &device, self.weights.quantize)?;
        let engines = self.engines_for(model.num_params());
        let config = model.config().clone();
        let strategy = self.strategy.resolve(&dir, config.num_layers)?;
        // Without a template the server still serves completions; say why chat is off.
        let chat = match ChatTemplate::from_dir(&dir) {
            Ok(template) => Some(template),
            Err(e) => {
                eprintln!("/v1/chat/completions is off: {e}");
                None
            }
        };
        let capacity = self
            .context
            .unwrap_or(config.max_position_embeddings.min(4096));
        let model_id = self.model_id.clone().unwrap_or_else(|| {
            std::fs::canonicalize(&dir)
                .unwrap_or(dir.clone())
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned())
        });
        let metrics = Arc::new(Metrics::default());
        let tokenizer = Arc::new(tokenizer);
        // The engine thread loads the caches and runs one untimed generation with the default
        // strategy, which also checks it against the model.
        let engine = layerskip_serve::spawn(
            model,
            tokenizer.clone(),
            capacity,
            (engines, self.batch as usize),
            Some(GenerateOptions::new(strategy)),
            metrics.clone(),
        )?;
        let state = Arc::new(AppState::new(
            engine,
            tokenizer,
            chat,
            model_id.clone(),
            strategy,
            config.eos_token_ids.clone(),
            metrics,
            self.max_body_bytes,
        ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        runtime.block_on(async move {
            let address = format!("{}:{}", self.host, self.port);
            let listener = tokio::net::TcpListener::bind(&address)
                .await
                .with_context(|| format!("listening on {address}"))?;
            let local = listener.local_addr()?;
            eprintln!(
                "serving {model_id} ({}) on http://{local} (context {capacity}, default {strategy:?}, {} engine(s), autoregressive batches of up to {})",
                dir.display(),
                engines,
                self.batch
            );
            layerskip_serve::serve(listener, state, shutdown_signal()).await?;
            eprintln!("shut down");
            Ok(())
        })
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    eprintln!("shutting down: finishing the requests in flight");
}
