//! Self-speculative decoding against the full model: greedy outputs equal token for token for
//! every exit layer and speculation count (f32), early exit at E = L is the full model, the
//! sampled output follows the full model's distribution (exact marginals, chi-square), and each
//! layer computes exactly the positions the algorithm needs.

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::FloatDType;
use layerskip_infer::{
    GenerateOptions, Generator, InferError, SamplingConfig, StopReason, Strategy,
};
use layerskip_model::{LlamaConfig, LlamaModel};

mod common;
use common::{config, options, random_model_on, run};

type B = Flex;

fn random_model(seed: u64, config: &LlamaConfig) -> LlamaModel<B> {
    random_model_on::<B>(seed, config, &Default::default())
}

#[test]
fn greedy_self_speculation_equals_autoregressive_for_every_exit_and_d() {
    // The third model's weights are bfloat16 values held in f32 (as a bf16 checkpoint loads):
    // the row kernels keep them in half the bytes, which must not change a single logit.
    let bf16_valued = random_model(3, &config(4, 40, 4, true))
        .cast(FloatDType::BF16)
        .cast(FloatDType::F32);
    let models = [
        (random_model(1, &config(6, 40, 2, false)), 6),
        (random_model(2, &config(4, 40, 4, true)), 4),
        (bf16_valued, 4),
    ];
    for (model, layers) in &models {
        for prompt in [vec![3u32], vec![5, 9, 1, 33, 7, 2, 18]] {
            let ar = run(model, &prompt, &options(Strategy::Autoregressive, 30));
            assert_eq!(ar.tokens.len(), 30);
            for exit_layer in 1..*layers {
                for speculations in [1, 2, 3, 5, 8] {
                    let ss = run(
                        model,
                        &prompt,
                        &options(
                            Strategy::SelfSpeculative {
                                exit_layer,
                                speculations,
                            },
                            30,
                        ),
                    );
                    assert_eq!(
                        ss.tokens, ar.tokens,
                        "E={exit_layer} d={speculations} prompt {prompt:?}"
                    );
                    assert_eq!(ss.stop, StopReason::MaxNewTokens);
                }
            }
            let ee = run(
                model,
                &prompt,
                &options(
                    Strategy::EarlyExit {
                        exit_layer: *layers,
                    },
                    30,
                ),
            );
            assert_eq!(ee.tokens, ar.tokens, "early exit at E = L");
        }
    }
}

/// Adaptive self-speculation (exit and draft count chosen at every step) gives the full
/// model's greedy tokens, whatever it chooses, with and without a draft vocabulary; on the
/// shipped LayerSkip model too. Every step is counted as drafted from one exit or taken
/// autoregressively, and the layers it computes follow from its steps.
#[test]
fn greedy_adaptive_self_speculation_equals_autoregressive() {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
    let models = [
        random_model(1, &config(6, 40, 2, false)),
        random_model(2, &config(4, 40, 4, true)),
        LlamaModel::<B>::from_pretrained(&shipped, &Default::default()).unwrap(),
    ];
    for (m, model) in models.iter().enumerate() {
        let mut drafted_from = std::collections::BTreeSet::new();
        for prompt in [vec![3u32], vec![5, 9, 1, 33, 7, 2, 18]] {
            let ar = run(model, &prompt, &options(Strategy::Autoregressive, 40));
            for max_speculations in [1, 3, 6] {
                for draft_vocab in [None, Some(20)] {
                    let mut o = options(Strategy::Adaptive { max_speculations }, 40);
                    o.draft_vocab = draft_vocab;
                    let got = run(model, &prompt, &o);
                    let what = format!("d <= {max_speculations} {draft_vocab:?} {prompt:?}");
                    assert_eq!(got.tokens, ar.tokens, "{what}");
                    let s = &got.stats;
                    let drafting: usize = s.exit_histogram.iter().sum();
                    assert_eq!(drafting + s.autoregressive_steps, s.steps, "{what}");
                    assert!(s.accepted <= s.drafted && s.drafted <= max_speculations * s.steps);
                    drafted_from
                        .extend((0..s.exit_histogram.len()).filter(|&e| s.exit_histogram[e] > 0));
                }
            }
        }
        if m == 2 {
            // The shipped model's early exits agree with its last layer often enough to draft
            // from, and the choice moves between exits.
            assert!(drafted_from.len() >= 2, "{drafted_from:?}");
        }
    }
}

/// One generator's adaptive generations learn from each other (fitted step costs, remembered
/// exit estimates) and stay exact: on the shipped model, the first generation's first steps
/// draft from the design's shallowest, middle and deepest exits and take an autoregressive
/// step, and every later generation, after a warm-up or not, with another draft limit or
/// prompt, still gives the autoregressive tokens.
#[test]
fn adaptive_generations_of_one_generator_learn_and_stay_exact() {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
    let model = LlamaModel::<B>::from_pretrained(&shipped, &Default::default()).unwrap();
    let prompts = [
        vec![5u32, 9, 1, 33, 7, 2, 18],
        vec![100, 200, 300],
        vec![42],
    ];
    let ar: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run(&model, p, &options(Strategy::Autoregressive, 48)).tokens)
        .collect();
    let mut generator = Generator::new(&model, 256).unwrap();
    let first = generator
        .generate(
            &prompts[0],
            &options(
                Strategy::Adaptive {
                    max_speculations: 6,
                },
                48,
            ),
            |_| true,
        )
        .unwrap();
    assert_eq!(first.tokens, ar[0]);
    let used = &first.stats.exit_histogram;
    let layers = model.num_layers();
    for exit in [1, layers / 2, layers - 1] {
        assert!(
            used.get(exit).is_some_and(|&n| n > 0),
            "exit {exit}: {used:?}"
        );
    }
    assert!(first.stats.autoregressive_steps >= 1);
    for round in 0..2 {
        for (p, prompt) in prompts.iter().enumerate() {
            for max_speculations in [6, 2] {
                let o = options(Strategy::Adaptive { max_speculations }, 48);
                let got = generator.generate(prompt, &o, |_| true).unwrap();
                assert_eq!(
                    got.tokens, ar[p],
                    "round {round} prompt {p} d <= {max_speculations}"
                );
            }
        }
        generator
            .warm_up(&options(
                Strategy::Adaptive {
                    max_speculations: 4,
                },
                8,
            ))
            .unwrap();
    }
}

/// Drafting over a vocabulary prefix changes what is drafted, never the output: greedy
/// self-speculation still equals autoregressive decoding, including when the full model's token
/// lies outside the prefix (a 40-token model drafting over 10 ids rejects those drafts).
#[test]
fn greedy_self_speculation_with_a_draft_vocabulary_equals_autoregressive() {
    let model = random_model(1, &config(6, 40, 2, false));
    let tied = random_model(2, &config(4, 40, 4, true));
    for model in [&model, &tied] {
        let prompt = [5u32, 9, 1, 33, 7, 2, 18];
        let ar = run(model, &prompt, &options(Strategy::Autoregressive, 30));
        assert!(
            ar.tokens.iter().any(|&t| t >= 10),
            "the test needs tokens outside the prefix"
        );
        for (exit_layer, speculations, prefix) in [(1, 3, 10), (2, 5, 25), (3, 2, 40)] {
            let mut o = options(
                Strategy::SelfSpeculative {
                    exit_layer,
                    speculations,
                },
                30,
            );
            o.draft_vocab = Some(prefix);
            let ss = run(model, &prompt, &o);
            assert_eq!(
                ss.tokens, ar.tokens,
                "E={exit_layer} d={speculations} prefix {prefix}"
            );
        }
    }
}

/// Stopping the draft at an uncertain token shortens drafts (at threshold 1 every step drafts
/// exactly one token) and never changes the greedy output.
#[test]
fn greedy_self_speculation_with_a_draft_confidence_equals_autoregressive() {
    let model = random_model(1, &config(6, 40, 2, false));
    let prompt = [5u32, 9, 1, 33, 7, 2, 18];
    let ar = run(&model, &prompt, &options(Strategy::Autoregressive, 30));
    let strategy = Strategy::SelfSpeculative {
        exit_layer: 2,
        speculations: 5,
    };
    let full = run(&model, &prompt, &options(strategy, 30));
    for threshold in [0.05, 0.3, 0.9, 1.0] {
        let mut o = options(strategy, 30);
        o.draft_confidence = Some(threshold);
        let ss = run(&model, &prompt, &o);
        assert_eq!(ss.tokens, ar.tokens, "threshold {threshold}");
        assert!(
            ss.stats.drafted <= full.stats.drafted,
            "threshold {threshold}"
        );
        if threshold == 1.0 {
            // At most one draft per step (none in a last step with one token of budget left).
            assert!(ss.stats.drafted <= ss.stats.steps, "one draft per step");
            assert!(ss.stats.accepted_histogram[2..].iter().all(|&c| c == 0));
        }
    }
    assert!(
        full.stats.drafted > full.stats.steps,
        "the test needs multi-token drafts"
    );
}

/// A first token restricted to some ids (token healing) is the full model's best among them
/// (by the model's own forward pass over the prompt, ranked here); after it, decoding goes on
/// from it. Every strategy applies it alike, so greedy self-speculation (static and adaptive)
/// and early exit at E = L give autoregressive decoding's tokens; sampling draws only among
/// the ids. Bad restrictions are refused.
#[test]
fn a_restricted_first_token_is_the_best_allowed_and_every_strategy_agrees() {
    let model = random_model(1, &config(6, 40, 2, false));
    let prompt = [5u32, 9, 1, 33, 7, 2, 18];
    let vocab = 40;
    let logits = model.exit_head(
        model
            .forward_layers(model.embed_ids(&prompt), 0..6, 0, None)
            .unwrap(),
    );
    let all = logits.into_data().to_vec::<f32>().unwrap();
    let last = &all[all.len() - vocab..];
    let mut ranked: Vec<u32> = (0..vocab as u32).collect();
    ranked.sort_by(|&a, &b| last[b as usize].total_cmp(&last[a as usize]));
    // Allowed: the 4th, 7th and 30th best (the best is out).
    let allowed = vec![ranked[29], ranked[3], ranked[6]];
    let restricted = |strategy| options(strategy, 20).with_first_token_among(Some(allowed.clone()));
    let ar = run(&model, &prompt, &restricted(Strategy::Autoregressive));
    assert_eq!(ar.tokens[0], ranked[3]);
    // The rest is ordinary decoding after the prompt and that token.
    let mut after = prompt.to_vec();
    after.push(ranked[3]);
    let rest = run(&model, &after, &options(Strategy::Autoregressive, 19));
    assert_eq!(ar.tokens[1..], rest.tokens[..]);
    for strategy in [
        Strategy::SelfSpeculative {
            exit_layer: 2,
            speculations: 3,
        },
        Strategy::SelfSpeculative {
            exit_layer: 4,
            speculations: 6,
        },
        Strategy::Adaptive {
            max_speculations: 4,
        },
        Strategy::EarlyExit { exit_layer: 6 },
    ] {
        let g = run(&model, &prompt, &restricted(strategy));
        assert_eq!(g.tokens, ar.tokens, "{strategy:?}");
    }
    // Sampled at a high temperature: every first token is one of the allowed.
    for seed in 0..40 {
        let sampling = SamplingConfig::default()
            .with_temperature(2.0)
            .with_seed(seed);
        let g = run(
            &model,
            &prompt,
            &restricted(Strategy::SelfSpeculative {
                exit_layer: 2,
                speculations: 3,
            })
            .with_sampling(sampling),
        );
        assert!(
            allowed.contains(&g.tokens[0]),
            "seed {seed}: {}",
            g.tokens[0]
        );
    }
    let mut generator = Generator::new(&model, 96).unwrap();
    for (ids, message) in [
        (vec![], "empty"),
        (vec![3, 40], "first-token id 40 is outside the vocabulary"),
    ] {
        let o = options(Strategy::Autoregressive, 4).with_first_token_among(Some(ids));
        let err = generator.generate(&prompt, &o, |_| true).unwrap_err();
        assert!(
            matches!(&err, InferError::InvalidArgument(m) if m.contains(message)),
            "{err}"
        );
    }
}

/// A stop token ends every strategy's generation where autoregressive decoding's first emits
/// it, also when it is a draft that the verifier accepted with more drafts after it; the
/// statistics count what was generated (the drafts after the stop token, though accepted, are
/// not).
#[test]
fn stop_token_inside_a_draft_ends_generation_at_the_same_place() {
    for seed in [0, 3] {
        let model = random_model(seed, &config(6, 40, 2, false));
        let prompt = [4u32, 8, 15];
        let ar = run(&model, &prompt, &options(Strategy::Autoregressive, 40));
        // Stop at the token the full model emits 2nd, 3rd, 4th or 9th (its first occurrence
        // ends the generation).
        for k in [1, 2, 3, 8] {
            let stop = ar.tokens[k];
            let first = ar.tokens.iter().position(|&t| t == stop).unwrap();
            for strategy in [
                Strategy::Autoregressive,
                Strategy::SelfSpeculative {
                    exit_layer: 2,
                    speculations: 6,
                },
                Strategy::SelfSpeculative {
                    exit_layer: 4,
                    speculations: 4,
                },
                Strategy::SelfSpeculative {
                    exit_layer: 4,
                    speculations: 12,
                },
                Strategy::SelfSpeculative {
                    exit_layer: 5,
                    speculations: 8,
                },
            ] {
                let mut o = options(strategy, 40);
                o.stop_tokens = vec![stop];
                let g = run(&model, &prompt, &o);
                let case = format!("seed {seed} stop #{k} {strategy:?}");
                assert_eq!(g.tokens, ar.tokens[..=first], "{case}");
                assert_eq!(g.stop, StopReason::StopToken, "{case}");
                // The first token, the accepted drafts and one verifier token per step, but for
                // a last step that stopped inside its drafts.
                let s = &g.stats;
                let made = 1 + s.accepted + s.steps;
                assert!(
                    made == g.tokens.len() || made == g.tokens.len() + 1,
                    "{case}: {} tokens, {} accepted in {} steps",
                    g.tokens.len(),
                    s.accepted,
                    s.steps
                );
                let histogram: usize = s
                    .accepted_histogram
                    .iter()
                    .enumerate()
                    .map(|(k, n)| k * n)
                    .sum();
                assert_eq!(histogram, s.accepted, "{case}");
            }
        }
    }
}

#[test]
fn each_layer_computes_committed_positions_once_plus_rejected_drafts() {
    let model = random_model(4, &config(6, 40, 2, false));
    let prompt = [1u32, 2, 3, 4, 5];
    let mut generator = Generator::new(&model, 96).unwrap();
    let g = generator
        .generate(
            &prompt,
            &options(
                Strategy::SelfSpeculative {
                    exit_layer: 2,
                    speculations: 4,
                },
                25,
            ),
            |_| true,
        )
        .unwrap();
    let s = &g.stats;
    let committed = prompt.len() + g.tokens.len() - 1; // the last token is never fed back
    let rejected = s.drafted - s.accepted;
    assert!(s.drafted > 0 && s.steps > 0);
    for (l, &positions) in s.layer_positions.iter().enumerate() {
        assert_eq!(positions, committed + rejected, "layer {l}: {s:?}");
        assert_eq!(
            generator.cache().len(l),
            committed,
            "layer {l} cache length"
        );
    }
    // KV bytes per position: keys and values of 6 layers, 2 kv heads of width 8, f32.
    let per_position = 2 * 6 * 2 * 8 * 4;
    assert_eq!(s.kv_allocated_bytes, 96 * per_position);
    let peak = s.kv_peak_used_bytes / per_position;
    assert!(
        (committed..=committed + 4).contains(&peak),
        "peak {peak} positions, committed {committed}"
    );
    assert_eq!(s.accepted_histogram.iter().sum::<usize>(), s.steps);
    let by_hist: usize = s
        .accepted_histogram
        .iter()
        .enumerate()
        .map(|(k, n)| k * n)
        .sum();
    assert_eq!(by_hist, s.accepted);
    // The full model and early exit compute every committed position once per layer they run.
    let ar = generator
        .generate(&prompt, &options(Strategy::Autoregressive, 25), |_| true)
        .unwrap();
    assert!(ar.stats.layer_positions.iter().all(|&p| p == committed));
    let ee = generator
        .generate(
            &prompt,
            &options(Strategy::EarlyExit { exit_layer: 2 }, 25),
            |_| true,
        )
        .unwrap();
    assert_eq!(
        ee.stats.layer_positions,
        vec![committed, committed, 0, 0, 0, 0]
    );
}

/// Exact marginal distributions of the first `steps` sampled tokens of the full model at
/// temperature 1, by enumerating every prefix (vocabulary 6).
fn exact_marginals(model: &LlamaModel<B>, prompt: &[u32], steps: usize) -> Vec<Vec<f64>> {
    let vocab = model.config().vocab_size;
    let mut marginals = vec![vec![0.0; vocab]; steps];
    let mut frontier: Vec<(Vec<u32>, f64)> = vec![(prompt.to_vec(), 1.0)];
    for marginal in marginals.iter_mut() {
        let mut next = Vec::new();
        for (seq, mass) in frontier {
            let logits = model.exit_head(
                model
                    .forward_layers(model.embed_ids(&seq), 0..model.num_layers(), 0, None)
                    .unwrap(),
            );
            let all = logits.into_data().to_vec::<f32>().unwrap();
            let last = &all[all.len() - vocab..];
            let max = last.iter().cloned().fold(f32::MIN, f32::max);
            let z: f64 = last.iter().map(|&l| ((l - max) as f64).exp()).sum();
            for (t, &l) in last.iter().enumerate() {
                let p = mass * ((l - max) as f64).exp() / z;
                marginal[t] += p;
                let mut s = seq.clone();
                s.push(t as u32);
                next.push((s, p));
            }
        }
        frontier = next;
    }
    marginals
}

#[test]
fn sampled_self_speculation_follows_the_full_model_distribution() {
    let model = random_model(5, &config(4, 6, 2, false));
    let prompt = [1u32, 4, 2];
    let exact = exact_marginals(&model, &prompt, 3);
    let mut generator = Generator::new(&model, 96).unwrap();
    let runs = 3000;
    // Drafting over ids 0..4 of 6 never proposes tokens 4 and 5: they come only from the
    // residual distribution on rejection, which must still give the full model's law.
    // A confidence threshold makes the number of drafts depend on the drafts drawn; the law
    // must not change either.
    for (draft_vocab, confidence) in [(None, None), (Some(4), None), (None, Some(0.4))] {
        check_sampled_marginals(
            &mut generator,
            &prompt,
            &exact,
            runs,
            draft_vocab,
            confidence,
        );
    }
    // The early exit's own law is far from the full model's, so accepting every draft would fail.
    let early = model.exit_head(
        model
            .forward_layers(model.embed_ids(&prompt), 0..1, 0, None)
            .unwrap(),
    );
    let e = early.into_data().to_vec::<f32>().unwrap();
    let q = &e[e.len() - 6..];
    let max = q.iter().cloned().fold(f32::MIN, f32::max);
    let z: f64 = q.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let tv: f64 = q
        .iter()
        .zip(&exact[0])
        .map(|(&l, &p)| (((l - max) as f64).exp() / z - p).abs())
        .sum::<f64>()
        / 2.0;
    assert!(
        tv > 0.1,
        "draft and target laws too close for the test to bite (tv {tv})"
    );
}

/// Samples `runs` self-speculative generations of 3 tokens and checks each position's counts
/// against the full model's exact marginals (chi-square, 5 degrees of freedom, 0.999 quantile).
fn check_sampled_marginals(
    generator: &mut Generator<'_, B>,
    prompt: &[u32],
    exact: &[Vec<f64>],
    runs: u64,
    draft_vocab: Option<usize>,
    draft_confidence: Option<f32>,
) {
    let mut counts = vec![vec![0usize; 6]; 3];
    for seed in 0..runs {
        let ss = Strategy::SelfSpeculative {
            exit_layer: 1,
            speculations: 3,
        };
        let sampling = SamplingConfig::default()
            .with_temperature(1.0)
            .with_seed(seed);
        let o = GenerateOptions::new(ss)
            .with_max_new_tokens(3)
            .with_sampling(sampling)
            .with_draft_vocab(draft_vocab)
            .with_draft_confidence(draft_confidence);
        let g = generator.generate(prompt, &o, |_| true).unwrap();
        for (i, &t) in g.tokens.iter().enumerate() {
            counts[i][t as usize] += 1;
        }
    }
    for (i, (c, p)) in counts.iter().zip(exact).enumerate() {
        let chi2: f64 = c
            .iter()
            .zip(p)
            .map(|(&o, &pi)| (o as f64 - runs as f64 * pi).powi(2) / (runs as f64 * pi))
            .sum();
        assert!(
            chi2 < 20.5,
            "draft vocab {draft_vocab:?}, confidence {draft_confidence:?}, token {i}: chi2 {chi2}, counts {c:?}, expected {p:?}"
        );
    }
}

#[test]
fn invalid_arguments_are_clear_errors() {
    let model = random_model(6, &config(4, 40, 2, false));
    let mut generator = Generator::new(&model, 16).unwrap();
    let mut err = |strategy, prompt: &[u32]| generator_err(&mut generator, strategy, prompt);
    assert!(err(Strategy::EarlyExit { exit_layer: 0 }, &[1]).contains("exit layer 0"));
    assert!(err(Strategy::EarlyExit { exit_layer: 5 }, &[1]).contains("exit layer 5"));
    assert!(
        err(
            Strategy::SelfSpeculative {
                exit_layer: 4,
                speculations: 2
            },
            &[1]
        )
        .contains("exit layer 4")
    );
    assert!(
        err(
            Strategy::SelfSpeculative {
                exit_layer: 2,
                speculations: 0
            },
            &[1]
        )
        .contains("speculations")
    );
    // More drafts than the context holds (16 here) are refused, not an overflow or an abort.
    for huge in [16, 100_000_000_000, usize::MAX] {
        let ss = Strategy::SelfSpeculative {
            exit_layer: 2,
            speculations: huge,
        };
        let e = err(ss, &[1]);
        assert!(e.contains("do not fit the context of 16"), "{e}");
    }
    for bad in [0, 41] {
        let mut o = options(
            Strategy::SelfSpeculative {
                exit_layer: 2,
                speculations: 2,
            },
            4,
        );
        o.draft_vocab = Some(bad);
        let e = generator
            .generate(&[1], &o, |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("draft vocabulary {bad}")), "{e}");
    }
    for bad in [0.0, 1.5, f32::NAN] {
        let mut o = options(
            Strategy::SelfSpeculative {
                exit_layer: 2,
                speculations: 2,
            },
            4,
        );
        o.draft_confidence = Some(bad);
        let e = generator
            .generate(&[1], &o, |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("draft confidence"), "{e}");
    }
    let mut err = |strategy, prompt: &[u32]| generator_err(&mut generator, strategy, prompt);
    assert!(err(Strategy::Autoregressive, &[]).contains("empty"));
    assert!(err(Strategy::Autoregressive, &[99]).contains("vocabulary"));
    assert!(err(Strategy::Autoregressive, &[1; 16]).contains("does not fit"));
    assert!(Generator::new(&model, 97).is_err());
    // A prompt that nearly fills the context generates until the context is full.
    let g = generator
        .generate(
            &[1; 14],
            &options(
                Strategy::SelfSpeculative {
                    exit_layer: 2,
                    speculations: 5,
                },
                50,
            ),
            |_| true,
        )
        .unwrap();
    assert_eq!((g.tokens.len(), g.stop), (2, StopReason::ContextFull));
}

fn generator_err(generator: &mut Generator<'_, B>, strategy: Strategy, prompt: &[u32]) -> String {
    match generator.generate(prompt, &options(strategy, 4), |_| true) {
        Err(e @ (InferError::InvalidArgument(_) | InferError::PromptTooLong { .. })) => {
            e.to_string()
        }
        other => panic!("expected an argument error, got {other:?}"),
    }
}

#[test]
fn smollm2_greedy_self_speculation_equals_autoregressive() {
    let dir = std::env::var_os("LAYERSKIP_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-135m")
        });
    if !dir.join("model.safetensors").is_file() {
        eprintln!(
            "SKIPPED: no converted SmolLM2 at {} (run `bash scripts/prepare_smollm2.sh`)",
            dir.display()
        );
        return;
    }
    let model = LlamaModel::<B>::from_pretrained(&dir, &Default::default()).unwrap();
    let tokenizer = layerskip_model::Tokenizer::from_file(&dir).unwrap();
    let prompt = tokenizer
        .encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
        .unwrap();
    let mut generator = Generator::new(&model, 256).unwrap();
    let mut o = options(Strategy::Autoregressive, 24);
    o.stop_tokens = model.config().eos_token_ids.clone();
    let ar = generator.generate(&prompt, &o, |_| true).unwrap();
    for (exit_layer, speculations) in [(4, 3), (20, 8), (29, 2)] {
        o.strategy = Strategy::SelfSpeculative {
            exit_layer,
            speculations,
        };
        let ss = generator.generate(&prompt, &o, |_| true).unwrap();
        assert_eq!(ss.tokens, ar.tokens, "E={exit_layer} d={speculations}");
        eprintln!(
            "E={exit_layer} d={speculations}: acceptance {:.2}",
            ss.stats.acceptance_rate().unwrap()
        );
    }
    o.strategy = Strategy::EarlyExit { exit_layer: 30 };
    assert_eq!(
        generator.generate(&prompt, &o, |_| true).unwrap().tokens,
        ar.tokens
    );
}

#[test]
fn next_token_margin_is_the_gap_of_the_full_models_two_best_logits() {
    let model = random_model(7, &config(4, 40, 2, false));
    let generator = Generator::new(&model, 96).unwrap();
    let context = [3u32, 1, 4, 1, 5];
    let m = generator.next_token_margin(&context).unwrap();
    let logits = model
        .forward(
            burn::tensor::Tensor::from_data(
                burn::tensor::TensorData::new(context.map(i64::from).to_vec(), [1, 5]),
                &Default::default(),
            ),
            0,
            None,
        )
        .unwrap()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let mut last: Vec<(f32, u32)> = logits[4 * 40..]
        .iter()
        .enumerate()
        .map(|(i, &l)| (l, i as u32))
        .collect();
    last.sort_by(|a, b| b.0.total_cmp(&a.0));
    assert_eq!((m.first, m.second), (last[0].1, last[1].1));
    assert!((m.margin - (last[0].0 - last[1].0)).abs() < 1e-6);
    assert!(m.margin > 0.0 && m.scale >= last[0].0.abs());
    // Ties get no slack in f32 beyond accumulated rounding: 16 rounding units of the logit scale.
    let f32_tol = layerskip_model::backend::Precision::F32.tie_tolerance(m.scale);
    assert!(f32_tol < 1e-4 * m.scale.max(1.0), "{f32_tol}");
}

/// What the stream says about each token: a self-speculative step sends `Rejected` (when a
/// draft was rejected), `Drafted { exit_layer, accepted }`, then its tokens, the first
/// `accepted` of them drafts; those are exactly early exit's greedy choices at `exit_layer`
/// after the same tokens (checked by an early-exit generation from each prefix), the drafted
/// and accepted counts add up to the statistics, and a corrected token differs from the draft
/// it replaces. Fixed and adaptive self-speculation alike; autoregressive decoding sends no
/// `Drafted`.
#[test]
fn stream_events_say_how_each_token_was_made() {
    use layerskip_infer::StreamEvent;
    #[derive(Debug)]
    enum Seen {
        Accepted(Vec<u32>),
        Rejected(Vec<u32>),
        Drafted(usize, usize),
    }
    let model = random_model(4, &config(4, 40, 2, false));
    let prompt = [5u32, 9, 1, 33, 7];
    let strategies = [
        Strategy::SelfSpeculative {
            exit_layer: 2,
            speculations: 3,
        },
        Strategy::Adaptive {
            max_speculations: 4,
        },
        Strategy::Autoregressive,
    ];
    for strategy in strategies {
        let mut generator = Generator::new(&model, 96).unwrap();
        let mut seen = Vec::new();
        let generation = generator
            .generate(&prompt, &options(strategy, 40), |event| {
                seen.push(match event {
                    StreamEvent::Accepted(t) => Seen::Accepted(t.to_vec()),
                    StreamEvent::Rejected(t) => Seen::Rejected(t.to_vec()),
                    StreamEvent::Drafted {
                        exit_layer,
                        accepted,
                    } => Seen::Drafted(exit_layer, accepted),
                    other => panic!("unexpected event {other:?}"),
                });
                true
            })
            .unwrap();
        let mut tokens = prompt.to_vec();
        let (mut drafted_steps, mut accepted_total, mut rejected) = (0, 0, None);
        let mut pending: Option<(usize, usize)> = None;
        for event in &seen {
            match event {
                Seen::Rejected(r) => rejected = Some(r[0]),
                Seen::Drafted(e, a) => pending = Some((*e, *a)),
                Seen::Accepted(new) => {
                    if let Some((exit_layer, accepted)) = pending.take() {
                        assert_eq!(new.len(), accepted + 1, "{strategy:?}: {seen:?}");
                        if let Strategy::SelfSpeculative { exit_layer: e, .. } = strategy {
                            assert_eq!(exit_layer, e);
                        }
                        drafted_steps += 1;
                        accepted_total += accepted;
                        for (i, &t) in new[..accepted].iter().enumerate() {
                            let prefix = [&tokens[..], &new[..i]].concat();
                            let early = run(
                                &model,
                                &prefix,
                                &options(Strategy::EarlyExit { exit_layer }, 1),
                            );
                            assert_eq!(early.tokens, [t], "{strategy:?}: draft {i} of a step");
                        }
                        if let Some(r) = rejected.take() {
                            assert_ne!(new[accepted], r, "a correction replaces the draft");
                        }
                    } else {
                        assert!(rejected.is_none(), "a rejection comes with Drafted");
                    }
                    tokens.extend(new);
                }
            }
        }
        assert_eq!(tokens[prompt.len()..], generation.tokens[..]);
        assert_eq!(accepted_total, generation.stats.accepted, "{strategy:?}");
        match strategy {
            Strategy::Autoregressive => assert_eq!(drafted_steps, 0),
            _ => assert!(drafted_steps > 0 && generation.stats.drafted > 0),
        }
    }
}
