//! Benchmark runs: a strategy over a set of prompts, summarised into one report, compared with
//! the autoregressive baseline run on the same prompts.

use layerskip_model::LayerSkipBackend;
use serde::{Deserialize, Serialize};

use crate::dataset::Sample;
use crate::error::Result;
use crate::metrics::{Bleu, exact_match, first_difference, rouge_l, rouge_n, token_agreement};
use layerskip_infer::{GenerateOptions, GenerationStats, Generator, Strategy};

/// The output of one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRun {
    /// The sample's id.
    pub id: String,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Statistics of the generation.
    pub stats: GenerationStats,
}

/// Runs `options.strategy` on every prompt (already tokenised, in `prompts`), after `warmup`
/// untimed generations of the first prompt. `decode` turns tokens into text; `progress` sees
/// each finished sample.
pub fn run_samples<B: LayerSkipBackend>(
    generator: &mut Generator<'_, B>,
    samples: &[Sample],
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    warmup: usize,
    decode: &dyn Fn(&[u32]) -> String,
    progress: &mut dyn FnMut(&SampleRun),
) -> Result<Vec<SampleRun>> {
    if let Some(first) = prompts.first() {
        for _ in 0..warmup {
            generator.generate(first, options, |_| true)?;
        }
    }
    let mut runs = Vec::with_capacity(samples.len());
    for (sample, prompt) in samples.iter().zip(prompts) {
        let g = generator.generate(prompt, options, |_| true)?;
        let run = SampleRun {
            id: sample.id.clone(),
            text: decode(&g.tokens),
            tokens: g.tokens,
            stats: g.stats,
        };
        progress(&run);
        runs.push(run);
    }
    Ok(runs)
}

/// Keeps, per sample, the faster of the run in `best` and the new one (`best` empty: takes
/// `runs`). Generation is deterministic, so both runs hold the same tokens; only the timings
/// differ. Taking each sample's fastest of several repeats filters out interference from other
/// work on the machine, which otherwise decides small speedups.
pub fn keep_fastest(best: &mut Vec<SampleRun>, runs: Vec<SampleRun>) {
    if best.is_empty() {
        *best = runs;
        return;
    }
    for (b, r) in best.iter_mut().zip(runs) {
        if r.stats.total_ms < b.stats.total_ms {
            *b = r;
        }
    }
}

/// Output quality against the dataset's references (means over samples that have one; BLEU is
/// pooled over the corpus).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Samples with a reference.
    pub samples: usize,
    /// ROUGE-1 F1.
    pub rouge1: f64,
    /// ROUGE-2 F1.
    pub rouge2: f64,
    /// ROUGE-L F1.
    pub rouge_l: f64,
    /// Corpus BLEU-4.
    pub bleu4: f64,
    /// Exact match rate.
    pub exact_match: f64,
}

/// Scores `runs` against the samples' references; `None` when no sample has one.
pub fn quality(samples: &[Sample], runs: &[SampleRun]) -> Option<Quality> {
    let mut q = Quality::default();
    let mut bleu = Bleu::default();
    for (s, r) in samples.iter().zip(runs) {
        let Some(reference) = &s.reference else {
            continue;
        };
        q.samples += 1;
        q.rouge1 += rouge_n(&r.text, reference, 1);
        q.rouge2 += rouge_n(&r.text, reference, 2);
        q.rouge_l += rouge_l(&r.text, reference);
        q.exact_match += exact_match(&r.text, reference);
        bleu.add(&r.text, reference);
    }
    if q.samples == 0 {
        return None;
    }
    let n = q.samples as f64;
    q.rouge1 /= n;
    q.rouge2 /= n;
    q.rouge_l /= n;
    q.exact_match /= n;
    q.bleu4 = bleu.score();
    Some(q)
}

/// One strategy's figures over a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyReport {
    /// The strategy.
    pub strategy: Strategy,
    /// Prompts run.
    pub samples: usize,
    /// Tokens generated in all.
    pub new_tokens: usize,
    /// Generated tokens per second (all tokens / all wall time, prefill included).
    pub tokens_per_second: f64,
    /// Milliseconds per token after the first (decode time / tokens, pooled over samples).
    pub time_per_token_ms: f64,
    /// Mean milliseconds to the first token (prefill + first step).
    pub time_to_first_token_ms: f64,
    /// Accepted / drafted (self-speculation).
    pub acceptance_rate: f64,
    /// Mean drafts accepted per verification step.
    pub mean_accepted_length: f64,
    /// Verification steps that accepted exactly `k` drafts, summed over samples.
    pub accepted_histogram: Vec<usize>,
    /// Largest KV bytes holding positions in any sample.
    pub kv_peak_bytes: usize,
    /// Peak resident memory of the process while this strategy ran, when the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Baseline time per token / this strategy's (1 for the baseline itself).
    pub speedup: f64,
    /// Mean token agreement with the baseline's outputs.
    pub token_agreement: f64,
    /// Samples whose tokens differ from the baseline's at all.
    pub mismatches: usize,
    /// Quality against the references.
    pub quality: Option<Quality>,
}

/// Summarises `runs` of `strategy`, compared with the `baseline` runs of the same samples.
pub fn summarise(
    strategy: Strategy,
    samples: &[Sample],
    runs: &[SampleRun],
    baseline: &[SampleRun],
    peak_rss_bytes: Option<u64>,
) -> StrategyReport {
    let sum = |f: fn(&GenerationStats) -> f64| runs.iter().map(|r| f(&r.stats)).sum::<f64>();
    let tokens = sum(|s| s.new_tokens as f64);
    // Decode time per token after the first, pooled over samples.
    let tpt = |rs: &[SampleRun]| {
        let ms: f64 = rs
            .iter()
            .map(|r| r.stats.total_ms - r.stats.time_to_first_token_ms)
            .sum();
        let n: f64 = rs
            .iter()
            .map(|r| r.stats.new_tokens.saturating_sub(1) as f64)
            .sum();
        ms / n.max(1.0)
    };
    let drafted = sum(|s| s.drafted as f64);
    let accepted = sum(|s| s.accepted as f64);
    let steps = sum(|s| s.steps as f64);
    let mut histogram: Vec<usize> = Vec::new();
    for r in runs {
        let h = &r.stats.accepted_histogram;
        histogram.resize(histogram.len().max(h.len()), 0);
        h.iter().enumerate().for_each(|(k, &n)| histogram[k] += n);
    }
    let pairs = || runs.iter().zip(baseline);
    let n = runs.len().max(1) as f64;
    StrategyReport {
        strategy,
        samples: runs.len(),
        new_tokens: tokens as usize,
        tokens_per_second: tokens / (sum(|s| s.total_ms) / 1e3).max(1e-9),
        time_per_token_ms: tpt(runs),
        time_to_first_token_ms: sum(|s| s.time_to_first_token_ms) / n,
        acceptance_rate: if drafted > 0.0 {
            accepted / drafted
        } else {
            0.0
        },
        mean_accepted_length: if drafted > 0.0 { accepted / steps } else { 0.0 },
        accepted_histogram: histogram,
        kv_peak_bytes: runs
            .iter()
            .map(|r| r.stats.kv_peak_used_bytes)
            .max()
            .unwrap_or(0),
        peak_rss_bytes,
        speedup: tpt(baseline) / tpt(runs).max(1e-9),
        token_agreement: pairs()
            .map(|(a, b)| token_agreement(&a.tokens, &b.tokens))
            .sum::<f64>()
            / n,
        mismatches: pairs()
            .filter(|(a, b)| first_difference(&a.tokens, &b.tokens).is_some())
            .count(),
        quality: quality(samples, runs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        tokens: Vec<u32>,
        total_ms: f64,
        ttft: f64,
        drafted: usize,
        accepted: usize,
    ) -> SampleRun {
        let mut stats = GenerationStats::default();
        stats.new_tokens = tokens.len();
        stats.total_ms = total_ms;
        stats.time_to_first_token_ms = ttft;
        stats.drafted = drafted;
        stats.accepted = accepted;
        stats.steps = drafted / 2;
        stats.accepted_histogram = if drafted > 0 {
            vec![1, 0, drafted / 2 - 1]
        } else {
            vec![]
        };
        SampleRun {
            id: String::new(),
            text: String::new(),
            stats,
            tokens,
        }
    }

    #[test]
    fn pooled_figures_by_hand() {
        let samples = vec![
            Sample {
                id: "a".into(),
                prompt: "p".into(),
                reference: Some("x y".into()),
            },
            Sample {
                id: "b".into(),
                prompt: "p".into(),
                reference: None,
            },
        ];
        // Baseline: 11 tokens in 10 + 100 ms and 5 tokens in 10 + 40 ms -> 140 ms / 14 = 10 ms.
        let base = vec![
            run(vec![1; 11], 110.0, 10.0, 0, 0),
            run(vec![2; 5], 50.0, 10.0, 0, 0),
        ];
        // Strategy: 11 tokens after 10 + 50 ms, 5 tokens (one differs) after 10 + 20 ms -> 5 ms.
        let mut other = vec![1; 11];
        other[3] = 9;
        let runs = vec![
            run(other, 60.0, 10.0, 8, 6),
            run(vec![2; 5], 30.0, 10.0, 4, 2),
        ];
        let r = summarise(Strategy::Autoregressive, &samples, &runs, &base, None);
        assert!((r.time_per_token_ms - 5.0).abs() < 1e-12);
        assert!((r.speedup - 2.0).abs() < 1e-12);
        assert!((r.tokens_per_second - 16.0 / 0.09).abs() < 1e-9);
        assert!((r.acceptance_rate - 8.0 / 12.0).abs() < 1e-12);
        assert!((r.mean_accepted_length - 8.0 / 6.0).abs() < 1e-12);
        assert_eq!(r.accepted_histogram, vec![2, 0, 4]);
        assert_eq!(r.mismatches, 1);
        assert!((r.token_agreement - (10.0 / 11.0 + 1.0) / 2.0).abs() < 1e-12);
        assert_eq!(r.quality.unwrap().samples, 1);
    }

    /// Each sample keeps its own fastest run, whichever pass it came from.
    #[test]
    fn keep_fastest_takes_each_samples_minimum() {
        let mut best = Vec::new();
        keep_fastest(
            &mut best,
            vec![run(vec![1], 50.0, 1.0, 0, 0), run(vec![2], 20.0, 1.0, 0, 0)],
        );
        keep_fastest(
            &mut best,
            vec![run(vec![1], 40.0, 1.0, 0, 0), run(vec![2], 30.0, 1.0, 0, 0)],
        );
        keep_fastest(
            &mut best,
            vec![run(vec![1], 45.0, 1.0, 0, 0), run(vec![2], 25.0, 1.0, 0, 0)],
        );
        let times: Vec<f64> = best.iter().map(|r| r.stats.total_ms).collect();
        assert_eq!(times, vec![40.0, 20.0]);
    }
}
