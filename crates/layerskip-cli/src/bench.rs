//! `layerskip bench` (a strategy against the autoregressive baseline on a dataset) and
//! `layerskip correctness` (greedy self-speculation must reproduce autoregressive decoding).

use layerskip_model::LayerSkipBackend;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use layerskip_eval::bench::{SampleRun, StrategyReport, keep_fastest, run_samples, summarise};
use layerskip_eval::metrics::first_difference;
use layerskip_infer::{Generator, Strategy};
use layerskip_model::backend::Precision;
use serde::Serialize;

use crate::backend::BackendTask;
use crate::infer::StrategyName;
use crate::progress::Progress;
use crate::samples::{DatasetArgs, GridArgs, Loaded, load, peak_rss, reset_peak_rss, write_output};

/// Runs `strategy` once over the loaded prompts `range` (after `warmup` untimed generations of
/// the first prompt).
fn run_once<B: LayerSkipBackend>(
    loaded: &Loaded<B>,
    generator: &mut Generator<'_, B>,
    args: &DatasetArgs,
    strategy: Strategy,
    range: std::ops::Range<usize>,
    warmup: usize,
) -> Result<Vec<SampleRun>> {
    let options = args.options(strategy, loaded.model.config().eos_token_ids.clone());
    let decode = |t: &[u32]| loaded.tokenizer.decode(t).unwrap_or_default();
    Ok(run_samples(
        generator,
        &loaded.samples[range.clone()],
        &loaded.prompts[range],
        &options,
        warmup,
        &decode,
        &mut |_| {},
    )?)
}

/// What [`measure_paired`] returns: the autoregressive runs and report, then the strategy's.
pub type Paired = (
    Vec<SampleRun>,
    StrategyReport,
    Vec<SampleRun>,
    StrategyReport,
);

/// Autoregressive decoding and `strategy`, alternating on each prompt for `args.repeats`
/// rounds, each prompt keeping its fastest run of each; the strategy is reported against the
/// autoregressive runs measured beside it. Alternating per prompt (a fraction of a second
/// apart) rather than per pass over the dataset keeps the two measurements of a prompt under
/// the same load on a shared machine.
pub fn measure_paired<B: LayerSkipBackend>(
    loaded: &Loaded<B>,
    generator: &mut Generator<'_, B>,
    args: &DatasetArgs,
    strategy: Strategy,
    progress: &Progress,
) -> Result<Paired> {
    reset_peak_rss();
    let same = strategy == Strategy::Autoregressive;
    let (mut base, mut runs) = (Vec::new(), Vec::new());
    for i in 0..loaded.prompts.len() {
        let warmup = if i == 0 { args.warmup } else { 0 };
        let (mut b, mut r) = (Vec::new(), Vec::new());
        for _ in 0..args.repeats.max(1) {
            let ar = run_once(
                loaded,
                generator,
                args,
                Strategy::Autoregressive,
                i..i + 1,
                warmup,
            )?;
            keep_fastest(&mut b, ar);
            if !same {
                keep_fastest(
                    &mut r,
                    run_once(loaded, generator, args, strategy, i..i + 1, warmup)?,
                );
            }
        }
        base.append(&mut b);
        runs.append(&mut r);
        progress.inc();
    }
    if same {
        runs = base.clone();
    }
    let rss = peak_rss();
    let report = |s, r: &[SampleRun]| summarise(s, &loaded.samples, r, &base, rss);
    let base_report = report(Strategy::Autoregressive, &base);
    let strategy_report = report(strategy, &runs);
    Ok((base, base_report, runs, strategy_report))
}

/// Prints reports as one table.
pub fn print_reports(reports: &[StrategyReport]) {
    println!(
        "{:<16} {:>8} {:>9} {:>8} {:>7} {:>7} {:>8} {:>7} {:>8} {:>7} {:>7} {:>6}",
        "strategy",
        "tok/s",
        "ms/tok",
        "ttft ms",
        "accept",
        "mean k",
        "speedup",
        "agree",
        "KV MiB",
        "RSS MiB",
        "ROUGE-L",
        "BLEU"
    );
    for r in reports {
        let mib = |b: f64| b / (1024.0 * 1024.0);
        let q = r.quality.as_ref();
        println!(
            "{:<16} {:>8.1} {:>9.2} {:>8.1} {:>6.1}% {:>7.2} {:>7.2}x {:>6.1}% {:>8.2} {:>7.0} {:>7.3} {:>6.3}",
            r.strategy.to_string(),
            r.tokens_per_second,
            r.time_per_token_ms,
            r.time_to_first_token_ms,
            100.0 * r.acceptance_rate,
            r.mean_accepted_length,
            r.speedup,
            100.0 * r.token_agreement,
            mib(r.kv_peak_bytes as f64),
            r.peak_rss_bytes.map_or(f64::NAN, |b| mib(b as f64)),
            q.map_or(f64::NAN, |q| q.rouge_l),
            q.map_or(f64::NAN, |q| q.bleu4),
        );
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub data: DatasetArgs,
    /// The strategy measured against the autoregressive baseline.
    #[arg(long, value_enum, default_value_t = StrategyName::SelfSpec)]
    pub strategy: StrategyName,
    /// Exit layer E (default: the model's recommendation, layerskip.json).
    #[arg(long)]
    pub exit_layer: Option<usize>,
    /// Drafts per self-speculative step (default: the model's recommendation, else 4).
    #[arg(long)]
    pub speculations: Option<usize>,
    /// Write the reports, per-sample outputs included, as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct BenchJson<'a> {
    model: &'a std::path::Path,
    samples: usize,
    max_new_tokens: usize,
    reports: Vec<StrategyReport>,
    outputs: Vec<(String, Vec<SampleRun>)>,
}

impl BackendTask for BenchArgs {
    fn run<B: LayerSkipBackend>(self, device: B::Device) -> Result<()> {
        if let Some(path) = &self.json {
            crate::samples::check_output_path(path)?;
        }
        let loaded = load::<B>(&self.data, &device)?;
        let layers = loaded.model.num_layers();
        let strategy = crate::infer::strategy_from(
            Some(self.strategy),
            self.exit_layer,
            self.speculations,
            layers,
            layerskip_model::Recommendation::read(&loaded.dir)?.as_ref(),
        )?;
        let mut generator = Generator::new(&loaded.model, loaded.capacity)?;
        let eos = loaded.model.config().eos_token_ids.clone();
        generator.validate(&loaded.prompts[0], &self.data.options(strategy, eos))?;
        eprintln!(
            "{}: {} prompts, {} new tokens each, AR and {} alternating, fastest of {} runs per prompt",
            loaded.dir.display(),
            loaded.samples.len(),
            self.data.max_new_tokens,
            strategy,
            self.data.repeats
        );
        let progress = Progress::new("bench: prompts", loaded.prompts.len());
        let (base_runs, base, runs, report) =
            measure_paired(&loaded, &mut generator, &self.data, strategy, &progress)?;
        progress.finish();
        let mut reports = vec![base];
        let mut outputs = vec![("AR".to_string(), base_runs)];
        if strategy != Strategy::Autoregressive {
            reports.push(report);
            outputs.push((strategy.to_string(), runs));
        }
        print_reports(&reports);
        if let Some(h) = reports.last().filter(|r| r.acceptance_rate > 0.0) {
            println!(
                "accepted drafts per step (histogram k: count): {:?}",
                h.accepted_histogram
            );
        }
        if let Some(path) = &self.json {
            let json = BenchJson {
                model: &loaded.dir,
                samples: loaded.samples.len(),
                max_new_tokens: self.data.max_new_tokens,
                reports,
                outputs,
            };
            write_output(path, &serde_json::to_string_pretty(&json)?)?;
        }
        Ok(())
    }
}

#[derive(Args, Debug)]
pub struct CorrectnessArgs {
    #[command(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    pub grid: GridArgs,
}

impl BackendTask for CorrectnessArgs {
    fn run<B: LayerSkipBackend>(self, device: B::Device) -> Result<()> {
        let loaded = load::<B>(&self.data, &device)?;
        let layers = loaded.model.num_layers();
        let exits = self.grid.exits(layers)?;
        let mut generator = Generator::new(&loaded.model, loaded.capacity)?;
        let eos = loaded.model.config().eos_token_ids.clone();
        let ar_options = self.data.options(Strategy::Autoregressive, eos.clone());
        let n = loaded.prompts.len();
        // Every point of the grid, then adaptive self-speculation up to the grid's largest d.
        let mut strategies: Vec<Strategy> = exits
            .iter()
            .flat_map(|&e| {
                self.grid
                    .speculations
                    .iter()
                    .map(move |&d| Strategy::SelfSpeculative {
                        exit_layer: e,
                        speculations: d,
                    })
            })
            .collect();
        strategies.push(Strategy::Adaptive {
            max_speculations: self.grid.speculations.iter().copied().max().unwrap_or(1),
        });
        let progress = Progress::new("correctness: generations", n * (1 + strategies.len()));
        let mut reference = Vec::new();
        for p in &loaded.prompts {
            reference.push(generator.generate(p, &ar_options, |_| true)?.tokens);
            progress.inc();
        }
        let precision = Precision::of_device::<B>(&device);
        let (mut checked, mut mismatches, mut ties) = (0, 0, 0);
        for &strategy in &strategies {
            let options = self.data.options(strategy, eos.clone());
            let (mut bad, mut tied) = (Vec::new(), 0);
            for ((s, p), want) in loaded.samples.iter().zip(&loaded.prompts).zip(&reference) {
                let got = generator.generate(p, &options, |_| true)?.tokens;
                progress.inc();
                checked += 1;
                let Some(pos) = first_difference(&got, want) else {
                    continue;
                };
                let (Some(&a), Some(&b)) = (want.get(pos), got.get(pos)) else {
                    bad.push(format!("{}: lengths differ at token {pos}", s.id));
                    continue;
                };
                let context: Vec<u32> = p.iter().chain(&want[..pos]).copied().collect();
                let m = generator.next_token_margin(&context)?;
                let tol = precision.tie_tolerance(m.scale);
                let what = format!(
                    "{} at token {pos} (AR {a}, self-spec {b}; full-model logit gap {:.2e}, \
                         {precision} tie tolerance {tol:.2e})",
                    s.id, m.margin
                );
                if m.margin <= tol {
                    tied += 1;
                    progress.suspend(|| println!("  tie: {what}"));
                } else {
                    bad.push(what);
                }
            }
            progress.suspend(|| {
                println!(
                    "{:<16} {} / {} outputs identical to autoregressive{}{}",
                    strategy.to_string(),
                    loaded.samples.len() - bad.len() - tied,
                    loaded.samples.len(),
                    if tied > 0 {
                        format!(", {tied} diverge at a rounding tie")
                    } else {
                        String::new()
                    },
                    if bad.is_empty() {
                        String::new()
                    } else {
                        format!("; MISMATCH: {}", bad.join("; "))
                    }
                )
            });
            mismatches += bad.len();
            ties += tied;
        }
        progress.finish();
        println!(
            "{checked} generations checked ({precision}), {mismatches} mismatches, {ties} rounding ties"
        );
        if mismatches > 0 {
            bail!(
                "{mismatches} self-speculative outputs differ from autoregressive decoding where \
                 the full model's choice is not a rounding tie"
            );
        }
        Ok(())
    }
}
