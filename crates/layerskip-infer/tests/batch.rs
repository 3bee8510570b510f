//! Batched decoding against the generator: every generation of a [`Batch`] (greedy, seeded
//! sampling, different prompts and lengths, joining while others run, ended by its callback) is
//! token for token what [`Generator::generate`] gives for it alone, on a random model and on the
//! shipped one.

use std::path::PathBuf;

use burn::backend::Flex;
use layerskip_infer::{
    Batch, GenerateOptions, Generation, Generator, InferError, SamplingConfig, StopReason,
    Strategy, StreamEvent,
};
use layerskip_model::LlamaModel;

mod common;
use common::{config, options, random_model_on};

type B = Flex;

fn alone(model: &LlamaModel<B>, prompt: &[u32], options: &GenerateOptions) -> Generation {
    Generator::new(model, 96)
        .unwrap()
        .generate(prompt, options, |_| true)
        .unwrap()
}

fn sampled(seed: u64, temperature: f32, max_new_tokens: usize) -> GenerateOptions {
    options(Strategy::Autoregressive, max_new_tokens).with_sampling(
        SamplingConfig::default()
            .with_temperature(temperature)
            .with_top_p(0.9)
            .with_repetition_penalty(1.1)
            .with_seed(seed),
    )
}

/// The requests: prompt and options, and the step of the batch at which each joins.
fn requests() -> Vec<(Vec<u32>, GenerateOptions, usize)> {
    vec![
        (
            vec![5, 9, 1, 33, 7],
            options(Strategy::Autoregressive, 30),
            0,
        ),
        (vec![3], sampled(7, 0.8, 25), 0),
        (
            vec![2, 4, 6, 8, 10, 12, 14],
            options(Strategy::Autoregressive, 4),
            0,
        ),
        (vec![11, 2, 30], sampled(8, 1.2, 20), 3),
        (vec![1, 1, 1, 1], options(Strategy::Autoregressive, 12), 6),
        (vec![17, 23], options(Strategy::Autoregressive, 1), 6),
        // Token healing's restriction of the first token, greedy and sampled.
        (
            vec![9, 4, 22, 13],
            options(Strategy::Autoregressive, 10).with_first_token_among(Some(vec![2, 7, 19, 31])),
            2,
        ),
        (
            vec![6, 6, 3],
            sampled(9, 1.0, 8).with_first_token_among(Some(vec![0, 5, 38])),
            2,
        ),
    ]
}

/// Runs `requests` through one batch; returns each request's generation and streamed tokens.
fn batched(
    model: &LlamaModel<B>,
    requests: &[(Vec<u32>, GenerateOptions, usize)],
) -> Vec<(Generation, Vec<u32>)> {
    let mut batch = Batch::new(model, 96, 8).unwrap();
    let mut slot_of = vec![None; requests.len()];
    let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
    let mut done: Vec<Option<Generation>> = vec![None; requests.len()];
    let mut step = 0;
    while done.iter().any(Option::is_none) {
        for (r, (prompt, options, at)) in requests.iter().enumerate() {
            if *at == step && slot_of[r].is_none() {
                let tokens = &mut streamed[r];
                let slot = batch
                    .admit(prompt, options, |event| {
                        if let StreamEvent::Accepted(t) = event {
                            tokens.extend_from_slice(t);
                        }
                        true
                    })
                    .unwrap();
                slot_of[r] = Some(slot);
            }
        }
        batch
            .step(|slot, event| {
                let r = slot_of.iter().position(|s| *s == Some(slot)).unwrap();
                if let StreamEvent::Accepted(t) = event {
                    streamed[r].extend_from_slice(t);
                }
                true
            })
            .unwrap();
        for (slot, generation) in batch.take_finished() {
            let r = slot_of.iter().position(|s| *s == Some(slot)).unwrap();
            slot_of[r] = None;
            done[r] = Some(generation);
        }
        step += 1;
        assert!(step < 200, "the batch never finished");
    }
    assert!(batch.is_empty());
    done.into_iter().map(Option::unwrap).zip(streamed).collect()
}

fn check(model: &LlamaModel<B>) {
    let requests = requests();
    for ((prompt, options, _), (got, streamed)) in requests.iter().zip(batched(model, &requests)) {
        let want = alone(model, prompt, options);
        assert_eq!(got.tokens, want.tokens, "prompt {prompt:?} {options:?}");
        assert_eq!(got.stop, want.stop);
        assert_eq!(streamed, want.tokens);
        assert_eq!(got.stats.new_tokens, want.tokens.len());
        assert_eq!(got.stats.prompt_tokens, prompt.len());
        if let Some(ids) = &options.first_token_among {
            assert!(ids.contains(&got.tokens[0]), "{:?}", got.tokens);
        }
    }
}

#[test]
fn batched_generations_equal_each_generation_alone() {
    check(&random_model_on::<B>(
        4,
        &config(4, 40, 2, true),
        &Default::default(),
    ));
}

#[test]
fn batched_generations_of_the_shipped_model_equal_each_alone() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
    let model = LlamaModel::<B>::from_pretrained(&dir, &Default::default()).unwrap();
    check(&model);
}

#[test]
fn a_generation_ended_by_its_callback_leaves_the_others_running() {
    let model = random_model_on::<B>(5, &config(4, 40, 2, false), &Default::default());
    let prompts = [vec![5u32, 9, 1], vec![3u32, 4]];
    let opts = options(Strategy::Autoregressive, 20);
    let mut batch = Batch::new(&model, 96, 2).unwrap();
    let first = batch.admit(&prompts[0], &opts, |_| true).unwrap();
    let second = batch.admit(&prompts[1], &opts, |_| true).unwrap();
    assert!(batch.is_full());
    let mut seen = 0;
    let mut finished = Vec::new();
    while !batch.is_empty() {
        batch
            .step(|slot, _| {
                if slot == first {
                    seen += 1;
                }
                !(slot == first && seen == 3)
            })
            .unwrap();
        finished.extend(batch.take_finished());
    }
    let stopped = &finished.iter().find(|(s, _)| *s == first).unwrap().1;
    assert_eq!(stopped.stop, StopReason::Callback);
    assert_eq!(
        stopped.tokens.len(),
        4,
        "the prompt's token and three steps"
    );
    let full = &finished.iter().find(|(s, _)| *s == second).unwrap().1;
    assert_eq!(full.tokens, alone(&model, &prompts[1], &opts).tokens);
}

#[test]
fn requests_a_batch_cannot_take_are_refused() {
    let model = random_model_on::<B>(6, &config(4, 40, 2, false), &Default::default());
    let mut batch = Batch::new(&model, 16, 1).unwrap();
    let spec = options(
        Strategy::SelfSpeculative {
            exit_layer: 2,
            speculations: 3,
        },
        4,
    );
    assert!(matches!(
        batch.admit(&[1, 2], &spec, |_| true),
        Err(InferError::InvalidArgument(m)) if m.contains("only autoregressive")
    ));
    let long: Vec<u32> = (0..16).collect();
    let ar = options(Strategy::Autoregressive, 4);
    assert!(matches!(
        batch.admit(&long, &ar, |_| true),
        Err(InferError::PromptTooLong { .. })
    ));
    batch.admit(&[1, 2], &ar, |_| true).unwrap();
    assert!(matches!(
        batch.admit(&[1, 2], &ar, |_| true),
        Err(InferError::InvalidArgument(m)) if m.contains("full")
    ));
    assert!(Batch::new(&model, 16, 0).is_err());
}

/// Greedy self-speculative requests (static, adaptive, with a confidence threshold) batched as
/// their autoregressive twins ([`Batch::exact_batched`]) get the tokens self-speculation gives
/// them alone, on the shipped model; early exit, sampled and penalised self-speculation have no
/// twin.
#[test]
fn greedy_self_speculation_batched_as_autoregressive_gives_its_own_tokens() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
    let model = LlamaModel::<B>::from_pretrained(&dir, &Default::default()).unwrap();
    let ss = |exit_layer, speculations| Strategy::SelfSpeculative {
        exit_layer,
        speculations,
    };
    let specs = [
        (vec![5u32, 9, 1, 33, 7], options(ss(5, 3), 40)),
        (vec![3u32], options(ss(2, 6), 33)),
        (
            vec![2u32, 4, 6],
            options(
                Strategy::Adaptive {
                    max_speculations: 4,
                },
                28,
            ),
        ),
        (
            vec![11u32, 2, 30],
            options(ss(4, 4), 25).with_draft_confidence(Some(0.3)),
        ),
    ];
    let requests: Vec<(Vec<u32>, GenerateOptions, usize)> = specs
        .iter()
        .enumerate()
        .map(|(i, (prompt, options))| {
            let twin = Batch::<B>::exact_batched(options).expect("greedy self-speculation");
            assert_eq!(twin.strategy, Strategy::Autoregressive);
            assert_eq!(twin.max_new_tokens, options.max_new_tokens);
            (prompt.clone(), twin, i)
        })
        .collect();
    for ((prompt, options), (got, _)) in specs.iter().zip(batched(&model, &requests)) {
        let want = alone(&model, prompt, options);
        assert_eq!(got.tokens, want.tokens, "{options:?}");
        assert!(want.stats.drafted > 0, "self-speculation drafted");
    }

    let sampled =
        options(ss(5, 3), 8).with_sampling(SamplingConfig::default().with_temperature(0.8));
    let penalised =
        options(ss(5, 3), 8).with_sampling(SamplingConfig::default().with_repetition_penalty(1.2));
    let early = options(Strategy::EarlyExit { exit_layer: 5 }, 8);
    for o in [sampled, penalised, early] {
        assert_eq!(Batch::<B>::exact_batched(&o), None, "{o:?}");
    }
    let ar = options(Strategy::Autoregressive, 8);
    assert_eq!(Batch::<B>::exact_batched(&ar), Some(ar));
}
