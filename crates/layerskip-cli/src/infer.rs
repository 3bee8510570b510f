//! `layerskip infer`: generate text with a chosen strategy, streaming tokens as they are accepted.

use layerskip_model::LayerSkipBackend;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use layerskip_infer::{
    ChatTemplate, GenerateOptions, Generation, Generator, SamplingConfig, Strategy, StreamEvent,
    TextStream,
};
use layerskip_model::{LlamaModel, Quantization, Recommendation, Tokenizer};

use crate::backend::BackendTask;

/// The model used when `--model` is not given, relative to the repository root.
pub const DEFAULT_MODEL: &str = "models/default";

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StrategyName {
    /// Full model, one token per step.
    Ar,
    /// Layers 0..E and the shared exit head.
    EarlyExit,
    /// Draft with layers 0..E, verify with E..L.
    SelfSpec,
    /// Self-speculation choosing E and d at every step from acceptance measured on the fly
    /// (DEL); --speculations is the most drafts per step.
    Adaptive,
}

#[derive(Args, Debug)]
pub struct InferArgs {
    /// Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub weights: WeightArgs,
    /// The prompt; without it and --prompt-file, prompts are read line by line from stdin.
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// A file whose whole content is the prompt.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    #[command(flatten)]
    pub strategy: StrategyArgs,
    /// Draft over the token ids 0..N only (the most frequent merges of a BPE vocabulary);
    /// verification keeps the full head, so the output does not change. Default: all.
    #[arg(long, value_name = "N")]
    pub draft_vocab: Option<usize>,
    /// Self-speculation stops drafting once a draft's probability under the early exit falls
    /// below P (that draft is still verified); the output does not change. Default: always
    /// draft --speculations tokens.
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub draft_confidence: Option<f32>,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Top-k filter (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Top-p (nucleus) filter.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Forbid repeating n-grams of this size (0 = off).
    #[arg(long, default_value_t = 0)]
    pub no_repeat_ngram: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the output contains this string (repeatable; not empty).
    #[arg(long, value_parser = crate::non_empty)]
    pub stop: Vec<String>,
    /// Wrap the prompt in the checkpoint's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Context positions (prompt + generation); default min(max_position_embeddings, 4096).
    #[arg(long)]
    pub context: Option<usize>,
    /// Show drafted-then-rejected tokens (dim red on a terminal, ⟦…⟧ otherwise).
    #[arg(long)]
    pub show_drafts: bool,
    /// Token healing: take the prompt's last token back and start the output with a token that
    /// begins with its text, so that a prompt ending where the tokenizer would merge on (a
    /// trailing newline before an indented line, a trailing space) continues as the model saw
    /// such text in training. The printed text is the continuation of the prompt as given.
    #[arg(long)]
    pub heal: bool,
    /// Print one JSON object with the text and the statistics instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// Skip the untimed warm-up generation before the first prompt (it compiles GPU kernels, so
    /// that the first prompt's time to first token is the steady one; CPU weights are packed
    /// when the model is loaded either way).
    #[arg(long)]
    pub no_warm_up: bool,
}

/// The decoding strategy's flags (`infer`; `serve`'s default for requests that name none).
#[derive(Args, Debug, Clone, Copy)]
pub struct StrategyArgs {
    /// Generation strategy (default: self-speculation at the model's recommended E and d if its
    /// directory records them in layerskip.json, else ar).
    #[arg(long, value_enum)]
    pub strategy: Option<StrategyName>,
    /// Exit layer E (number of layers run by early exit or used to draft; default: the
    /// model's recommendation).
    #[arg(long)]
    pub exit_layer: Option<usize>,
    /// Drafts per self-speculative step (default: the model's recommendation, else 4).
    #[arg(long)]
    pub speculations: Option<usize>,
}

impl StrategyArgs {
    /// The strategy for the model in `dir` of `layers` layers (see [`strategy_from`]).
    pub fn resolve(&self, dir: &Path, layers: usize) -> Result<Strategy> {
        strategy_from(
            self.strategy,
            self.exit_layer,
            self.speculations,
            layers,
            Recommendation::read(dir)?.as_ref(),
        )
    }
}

/// The strategy a command line names. Without `--strategy`: self-speculation at the model's
/// recommendation (`--exit-layer` and `--speculations` override its E and d) if its directory
/// records one, else autoregressive decoding. `--exit-layer` is required for early exit and
/// self-speculation unless the recommendation gives it.
pub fn strategy_from(
    name: Option<StrategyName>,
    exit_layer: Option<usize>,
    speculations: Option<usize>,
    layers: usize,
    recommended: Option<&Recommendation>,
) -> Result<Strategy> {
    let name = match (name, recommended) {
        (Some(name), _) => name,
        (None, Some(_)) => StrategyName::SelfSpec,
        (None, None) => StrategyName::Ar,
    };
    let exit = || {
        exit_layer
            .or(recommended.map(|r| r.exit_layer))
            .with_context(|| {
                format!(
                    "--exit-layer is required for this strategy (the model has {layers} layers)"
                )
            })
    };
    let speculations = speculations
        .or(recommended.map(|r| r.speculations))
        .unwrap_or(4);
    Ok(match name {
        StrategyName::Ar if exit_layer.is_some() => bail!(
            "--exit-layer applies to --strategy early-exit and self-spec; autoregressive decoding runs all {layers} layers"
        ),
        StrategyName::Ar => Strategy::Autoregressive,
        StrategyName::EarlyExit => Strategy::EarlyExit {
            exit_layer: exit()?,
        },
        StrategyName::SelfSpec => Strategy::SelfSpeculative {
            exit_layer: exit()?,
            speculations,
        },
        StrategyName::Adaptive if exit_layer.is_some() => bail!(
            "--exit-layer does not apply to --strategy adaptive, which chooses the exit layer at every step"
        ),
        StrategyName::Adaptive => Strategy::Adaptive {
            max_speculations: speculations,
        },
    })
}

/// How decoding keeps the weights.
#[derive(Args, Debug, Clone, Copy)]
pub struct WeightArgs {
    /// Keep the weights quantized for decoding (CPU): q8_0, q4_0 or q4_1 (ggml's block formats
    /// by its reference quantizers; as llama.cpp, activations are quantized to 8 bits per block
    /// of 32 and blocks summed in integers; a checkpoint converted from a Q8_0 or Q4_0 GGUF gets
    /// the file's own numbers back). Default: the checkpoint's precision.
    #[arg(long)]
    pub quantize: Option<Quantization>,
}

/// Loads a checkpoint directory for decoding: the model, its weights prepared for the decode
/// path (quantized if asked) before the first token, the loaded copies the prepared state
/// replaces freed as each layer is read ([`LlamaModel::from_pretrained_for_decoding`]: on the
/// CPU each weight is held once, packed), and its tokenizer, checked to fit the model's vocabulary.
pub fn load_for_decoding<B: LayerSkipBackend>(
    dir: &Path,
    device: &B::Device,
    quantize: Option<Quantization>,
) -> Result<(LlamaModel<B>, Tokenizer)> {
    let model = LlamaModel::<B>::from_pretrained_for_decoding(dir, device, quantize)
        .with_context(|| format!("loading {}", dir.display()))?;
    let tokenizer = Tokenizer::from_file(dir)?;
    tokenizer.check_fits(model.config().vocab_size, dir)?;
    Ok((model, tokenizer))
}

/// [`load_for_decoding`] keeping the loaded weights beside the prepared ones: what evaluation
/// needs, whose long passes take Burn's matmul over the full-precision weights.
pub fn load_prepared<B: LayerSkipBackend>(
    dir: &Path,
    device: &B::Device,
    quantize: Option<Quantization>,
) -> Result<(LlamaModel<B>, Tokenizer)> {
    let (model, tokenizer) = load::<B>(dir, device)?;
    model.prepare_for_decoding(quantize)?;
    Ok((model, tokenizer))
}

/// The model and its tokenizer, checked to fit the model's vocabulary.
fn load<B: LayerSkipBackend>(dir: &Path, device: &B::Device) -> Result<(LlamaModel<B>, Tokenizer)> {
    let model = LlamaModel::<B>::from_pretrained(dir, device)
        .with_context(|| format!("loading {}", dir.display()))?;
    let tokenizer = Tokenizer::from_file(dir)?;
    tokenizer.check_fits(model.config().vocab_size, dir)?;
    Ok((model, tokenizer))
}

/// The most bytes a token of a byte-level BPE vocabulary plausibly spans: a prompt file larger
/// than this many bytes per context position cannot fit the context.
const BYTES_PER_TOKEN_BOUND: u64 = 256;

/// Reads `--prompt-file`, refusing one that cannot fit a context of `capacity` positions
/// without reading it all (a device such as /dev/zero never ends).
fn read_prompt_file(path: &std::path::Path, capacity: usize) -> Result<String> {
    use std::io::Read;
    let limit = capacity as u64 * BYTES_PER_TOKEN_BOUND;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > limit {
        bail!(
            "--prompt-file {} holds more than {limit} bytes, more text than a context of {capacity} \
             positions can take; shorten it (or raise --context)",
            path.display()
        );
    }
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", path.display()))
}

/// Resolves `--model`, or the default model shipped with the repository.
pub fn model_dir(model: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = model {
        return Ok(dir.clone());
    }
    let candidates = [
        PathBuf::from(DEFAULT_MODEL),
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(DEFAULT_MODEL),
    ];
    match candidates.iter().find(|d| d.join("config.json").is_file()) {
        Some(dir) => Ok(dir.clone()),
        None => bail!(
            "no --model given and the default model ({DEFAULT_MODEL}) is not in this checkout yet; \
             pass --model DIR, e.g. --model models/smollm2-135m after `bash scripts/prepare_smollm2.sh`"
        ),
    }
}

impl BackendTask for InferArgs {
    fn run<B: LayerSkipBackend>(self, device: B::Device) -> Result<()> {
        let dir = model_dir(&self.model)?;
        let (model, tokenizer) = load_for_decoding::<B>(&dir, &device, self.weights.quantize)?;
        let config = model.config();
        let capacity = self
            .context
            .unwrap_or(config.max_position_embeddings.min(4096));
        let sampling = SamplingConfig::default()
            .with_temperature(self.temperature)
            .with_top_k(self.top_k)
            .with_top_p(self.top_p)
            .with_repetition_penalty(self.repetition_penalty)
            .with_no_repeat_ngram(self.no_repeat_ngram)
            .with_seed(self.seed);
        let options = GenerateOptions::new(self.strategy.resolve(&dir, config.num_layers)?)
            .with_max_new_tokens(self.max_new_tokens)
            .with_sampling(sampling)
            .with_stop_tokens(config.eos_token_ids.clone())
            .with_draft_vocab(self.draft_vocab)
            .with_draft_confidence(self.draft_confidence);
        let chat = if self.chat {
            Some(ChatTemplate::from_dir(&dir)?)
        } else {
            None
        };
        let mut generator = Generator::new(&model, capacity)?;
        if !self.no_warm_up {
            let ms = generator.warm_up(&options)?;
            if !self.json {
                eprintln!("warm-up: {ms:.0} ms (kernels compiled)");
            }
        }
        let prompts: Vec<String> = match (&self.prompt, &self.prompt_file) {
            (Some(p), _) => vec![p.clone()],
            (None, Some(f)) => vec![read_prompt_file(f, capacity)?],
            (None, None) => {
                if std::io::stdin().is_terminal() {
                    eprintln!("interactive: one prompt per line, Ctrl-D to quit");
                }
                return interactive(&self, &mut generator, &tokenizer, chat.as_ref(), &options);
            }
        };
        for prompt in prompts {
            run_one(
                &self,
                &mut generator,
                &tokenizer,
                chat.as_ref(),
                &options,
                &prompt,
            )?;
        }
        Ok(())
    }
}

fn interactive<B: LayerSkipBackend>(
    args: &InferArgs,
    generator: &mut Generator<'_, B>,
    tokenizer: &Tokenizer,
    chat: Option<&ChatTemplate>,
    options: &GenerateOptions,
) -> Result<()> {
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if !line.trim().is_empty() {
            run_one(args, generator, tokenizer, chat, options, &line)?;
        }
    }
    Ok(())
}

/// Streams decoded text: prints what each batch of accepted tokens adds ([`TextStream`], the
/// same text the server streams).
struct Printer<'t> {
    tokenizer: &'t Tokenizer,
    stream: TextStream<'t>,
    colour: bool,
    show_drafts: bool,
    quiet: bool,
}

impl Printer<'_> {
    fn print(&self, text: &str) {
        if !self.quiet && !text.is_empty() {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
    }

    /// Prints what was held back once the generation has ended.
    fn finish(&mut self) {
        let rest = self.stream.finish();
        self.print(&rest);
    }

    /// Handles one event; returns false once a stop string has appeared.
    fn event(&mut self, event: StreamEvent<'_>) -> bool {
        match event {
            StreamEvent::Accepted(tokens) => {
                let delta = self.stream.push(tokens);
                self.print(&delta);
                !self.stream.stopped()
            }
            StreamEvent::Rejected(tokens) => {
                if self.show_drafts && !self.quiet {
                    let text = self.tokenizer.decode(tokens).unwrap_or_default();
                    if self.colour {
                        print!("\x1b[2;31m{text}\x1b[0m")
                    } else {
                        print!("⟦{text}⟧")
                    }
                }
                true
            }
            _ => true,
        }
    }
}

fn run_one<B: LayerSkipBackend>(
    args: &InferArgs,
    generator: &mut Generator<'_, B>,
    tokenizer: &Tokenizer,
    chat: Option<&ChatTemplate>,
    options: &GenerateOptions,
    prompt: &str,
) -> Result<()> {
    let text = match chat {
        Some(t) => t.render_user(prompt)?,
        None => prompt.to_string(),
    };
    let mut ids = tokenizer.encode(&text)?;
    let mut stream = TextStream::new(tokenizer, args.stop.clone());
    let mut options = options.clone();
    let mut healed = None;
    if args.heal {
        if let Some(healing) = tokenizer.healing(&ids) {
            stream = TextStream::healed(tokenizer, args.stop.clone(), &healing.text);
            options = options.with_first_token_among(Some(healing.allowed));
            ids = healing.prompt;
            healed = Some(healing.text);
        }
    } else if let [_, .., last] = ids[..] {
        // A trailing newline or space: a token a byte-level BPE merges with what follows, so
        // the model rarely saw it alone there (the shipped model answers with EOS).
        let text = tokenizer.decode(&[last])?;
        if !text.is_empty() && text.trim().is_empty() {
            eprintln!(
                "note: the prompt ends with {text:?} as a token of its own, which the tokenizer \
                 merges with the text after it in training; --heal lets the model write it merged"
            );
        }
    }
    let options = &options;
    let mut printer = Printer {
        tokenizer,
        stream,
        colour: std::io::stdout().is_terminal(),
        show_drafts: args.show_drafts,
        quiet: args.json,
    };
    let generation = generator.generate(&ids, options, |e| printer.event(e))?;
    printer.finish();
    // The generator only knows that the callback stopped it; the printer knows why.
    let stop = if printer.stream.stopped() {
        "StopString".to_string()
    } else {
        format!("{:?}", generation.stop)
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json_report(
                &generation,
                &stop,
                (printer.stream.emitted(), healed.as_deref()),
                options
            ))?
        );
    } else {
        println!();
        let s = &generation.stats;
        eprintln!(
            "[{} prompt + {} new tokens, stop: {stop}, {:.1} tokens/s, {:.1} ms/token, first token {:.0} ms{}]",
            s.prompt_tokens,
            s.new_tokens,
            s.tokens_per_second(),
            s.time_per_token_ms(),
            s.time_to_first_token_ms,
            if let Some(rate) = s.acceptance_rate() {
                format!(
                    ", acceptance {:.1}% ({}/{}), accepted per step {:?}",
                    100.0 * rate,
                    s.accepted,
                    s.drafted,
                    s.accepted_histogram
                )
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// The generation as JSON; `text` is what was printed (the stream's text: cut before a stop
/// string, without the text of the prompt token that healing took back, `healed`, with which
/// the first of `tokens` begins).
fn json_report(
    g: &Generation,
    stop: &str,
    (text, healed): (&str, Option<&str>),
    options: &GenerateOptions,
) -> serde_json::Value {
    let s = &g.stats;
    serde_json::json!({
        "text": text,
        "healed": healed,
        "tokens": g.tokens,
        "stop": stop,
        "strategy": options.strategy,
        "sampling": options.sampling,
        "stats": s,
        "acceptance_rate": s.acceptance_rate(),
        "mean_accepted_length": s.mean_accepted_length(),
        "tokens_per_second": s.tokens_per_second(),
        "time_per_token_ms": s.time_per_token_ms(),
    })
}
