//! `layerskip sweep`: self-speculation over an exit-layer x speculations grid, each point
//! benchmarked against autoregressive decoding measured beside it, and adaptive
//! self-speculation (exit and drafts chosen at every step, up to the grid's largest d) measured
//! the same way; CSV, JSON and heatmaps, the best static point and how the adaptive one
//! compares.

use layerskip_model::LayerSkipBackend;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use layerskip_eval::bench::{StrategyReport, keep_fastest, summarise};
use layerskip_infer::{Generator, Strategy};

use crate::backend::BackendTask;
use crate::bench::{measure_paired, print_reports};
use crate::plot::{Heatmap, heatmap};
use crate::progress::Progress;
use crate::samples::{DatasetArgs, GridArgs, Loaded, load, write_output};
use layerskip_model::Recommendation;
use layerskip_model::checkpoint::RECOMMENDATION_FILE;

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    pub grid: GridArgs,
    /// Output directory: sweep.csv, sweep.json, sweep_tokens_per_s.svg, sweep_acceptance.svg.
    #[arg(long, default_value = "sweep")]
    pub out: PathBuf,
    /// Record the best point in the model directory (layerskip.json), where `infer`, `bench`
    /// and `serve` take it as the default strategy; nothing is recorded if no point beats
    /// autoregressive decoding with outputs identical to it.
    #[arg(long)]
    pub record: bool,
}

/// The grid as CSV, one row per point.
pub fn csv(reports: &[StrategyReport]) -> String {
    let mut out = String::from(
        "exit_layer,speculations,tokens_per_second,time_per_token_ms,time_to_first_token_ms,\
         acceptance_rate,mean_accepted_length,speedup,token_agreement,mismatches\n",
    );
    for r in reports {
        // Autoregressive decoding is exit 0; adaptive self-speculation's exit is "auto".
        let e = match r.strategy.exit_layer() {
            Some(e) => e.to_string(),
            None if r.strategy.speculations().is_some() => "auto".into(),
            None => "0".into(),
        };
        let d = r.strategy.speculations().unwrap_or(0);
        let _ = writeln!(
            out,
            "{e},{d},{:.3},{:.4},{:.3},{:.4},{:.4},{:.4},{:.4},{}",
            r.tokens_per_second,
            r.time_per_token_ms,
            r.time_to_first_token_ms,
            r.acceptance_rate,
            r.mean_accepted_length,
            r.speedup,
            r.token_agreement,
            r.mismatches
        );
    }
    out
}

impl BackendTask for SweepArgs {
    fn run<B: LayerSkipBackend>(self, device: B::Device) -> Result<()> {
        let loaded = load::<B>(&self.data, &device)?;
        let exits = self.grid.exits(loaded.model.num_layers())?;
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating --out {}", self.out.display()))?;
        let (base, grid, adaptive) = self.measure(&loaded, &exits)?;
        let mut all = vec![base];
        all.extend(grid.iter().cloned());
        all.push(adaptive.clone());
        print_reports(&all);
        write_output(&self.out.join("sweep.csv"), &csv(&all))?;
        write_output(
            &self.out.join("sweep.json"),
            &serde_json::to_string_pretty(&all)?,
        )?;
        self.heatmaps(&exits, &grid)?;
        let best = grid
            .iter()
            .max_by(|a, b| a.speedup.total_cmp(&b.speedup))
            .expect("a non-empty grid");
        println!(
            "best: {} at {:.2} ms/token after the first token (AR {:.2}), speedup {:.2}x, acceptance {:.1}% ({} mismatching outputs)",
            best.strategy,
            best.time_per_token_ms,
            best.time_per_token_ms * best.speedup,
            best.speedup,
            100.0 * best.acceptance_rate,
            best.mismatches
        );
        println!(
            "adaptive: {} at {:.2} ms/token after the first token, speedup {:.2}x, acceptance {:.1}% ({} mismatching outputs); {:.2}x the best static point's speedup",
            adaptive.strategy,
            adaptive.time_per_token_ms,
            adaptive.speedup,
            100.0 * adaptive.acceptance_rate,
            adaptive.mismatches,
            adaptive.speedup / best.speedup
        );
        if self.record {
            self.record(best, &loaded)?;
        }
        Ok(())
    }
}

impl SweepArgs {
    /// Every grid point and the adaptive point, each against autoregressive runs taken beside
    /// it (the AR row keeps each prompt's fastest run over all of them): the AR row, the grid
    /// (exits major) and the adaptive row.
    fn measure<B: LayerSkipBackend>(
        &self,
        loaded: &Loaded<B>,
        exits: &[usize],
    ) -> Result<(StrategyReport, Vec<StrategyReport>, StrategyReport)> {
        let mut generator = Generator::new(&loaded.model, loaded.capacity)?;
        let mut base_runs = Vec::new();
        let progress = Progress::new(
            "sweep: prompts x grid points (and the adaptive point)",
            loaded.prompts.len() * (exits.len() * self.grid.speculations.len() + 1),
        );
        // Measures one strategy against AR runs beside it, printing its line.
        let mut measure = |strategy: Strategy| -> Result<StrategyReport> {
            let (ar, ar_report, _, r) =
                measure_paired(loaded, &mut generator, &self.data, strategy, &progress)?;
            keep_fastest(&mut base_runs, ar);
            progress.println(&format!(
                "{:<16} {:.2} ms/token (AR beside it {:.2}), acceptance {:.1}%, speedup {:.2}x",
                strategy.to_string(),
                r.time_per_token_ms,
                ar_report.time_per_token_ms,
                100.0 * r.acceptance_rate,
                r.speedup
            ));
            Ok(r)
        };
        let mut grid = Vec::new();
        for &e in exits {
            for &d in &self.grid.speculations {
                grid.push(measure(Strategy::SelfSpeculative {
                    exit_layer: e,
                    speculations: d,
                })?);
            }
        }
        let most = self.grid.speculations.iter().copied().max().unwrap_or(1);
        let adaptive = measure(Strategy::Adaptive {
            max_speculations: most,
        })?;
        progress.finish();
        let base = summarise(
            Strategy::Autoregressive,
            &loaded.samples,
            &base_runs,
            &base_runs,
            crate::samples::peak_rss(),
        );
        Ok((base, grid, adaptive))
    }

    /// Heatmaps over exits x speculations of tokens/s, acceptance and speedup.
    fn heatmaps(&self, exits: &[usize], grid: &[StrategyReport]) -> Result<()> {
        let width = self.grid.speculations.len();
        let cell = |f: fn(&StrategyReport) -> f64| -> Vec<Vec<Option<f64>>> {
            grid.chunks(width)
                .map(|row| row.iter().map(|r| Some(f(r))).collect())
                .collect()
        };
        let maps = [
            (
                "sweep_tokens_per_s.svg",
                "tokens/s (self-speculative)",
                cell(|r| r.tokens_per_second),
                1,
            ),
            (
                "sweep_acceptance.svg",
                "acceptance rate (%)",
                cell(|r| 100.0 * r.acceptance_rate),
                0,
            ),
            (
                "sweep_speedup.svg",
                "speedup over autoregressive",
                cell(|r| r.speedup),
                2,
            ),
        ];
        for (file, title, values, decimals) in &maps {
            let path = self.out.join(file);
            heatmap(
                &path,
                &Heatmap {
                    title,
                    x_label: "speculations d",
                    y_label: "exit layer E",
                    x_ticks: &self.grid.speculations,
                    y_ticks: exits,
                    values,
                    decimals: *decimals,
                },
            )?;
            eprintln!("wrote {}", path.display());
        }
        Ok(())
    }

    /// Writes the best point to the checkpoint's `layerskip.json` if it beat autoregressive
    /// decoding with identical outputs.
    fn record<B: LayerSkipBackend>(&self, best: &StrategyReport, loaded: &Loaded<B>) -> Result<()> {
        let (Some(exit_layer), Some(speculations)) =
            (best.strategy.exit_layer(), best.strategy.speculations())
        else {
            unreachable!("the grid holds self-speculative points")
        };
        if best.mismatches > 0 || best.speedup <= 1.0 {
            println!("nothing recorded: no point beat AR with identical outputs");
            return Ok(());
        }
        let recommendation = Recommendation {
            exit_layer,
            speculations,
            speedup: Some((best.speedup * 1000.0).round() / 1000.0),
            measured: Some(format!(
                "layerskip sweep: {} prompts x {} new tokens, {:.3} ms/token after the first",
                loaded.samples.len(),
                self.data.max_new_tokens,
                best.time_per_token_ms
            )),
        };
        recommendation.write(&loaded.dir)?;
        println!(
            "recorded E={exit_layer} d={speculations} in {}",
            loaded.dir.join(RECOMMENDATION_FILE).display()
        );
        Ok(())
    }
}
