//! Helpers shared by the generation test binaries: tiny random Llama models on any backend and a
//! greedy exactness grid that tells rounding ties from wrong tokens.
#![allow(dead_code)] // each test binary uses a subset

use layerskip_infer::{GenerateOptions, Generation, Generator, Strategy};
use layerskip_model::LayerSkipBackend;
use layerskip_model::backend::Precision;
use layerskip_model::{LlamaConfig, LlamaModel, RopeConfig};

/// A tiny Llama: width 32, 4 heads of 8, context 96.
pub fn config(layers: usize, vocab: usize, kv_heads: usize, tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: vocab,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: layers,
        num_heads: 4,
        num_kv_heads: kv_heads,
        head_dim: 8,
        max_position_embeddings: 96,
        rms_norm_eps: 1e-5,
        rope: RopeConfig {
            theta: 10_000.0,
            llama3_scaling: None,
        },
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

/// Weights wide enough (std 0.15) that logits are far from ties and the layers matter.
pub fn random_model_on<B: LayerSkipBackend>(
    seed: u64,
    config: &LlamaConfig,
    device: &B::Device,
) -> LlamaModel<B> {
    B::seed(device, seed);
    LlamaModel::init_with_std(config, 0.15, device).unwrap()
}

/// Greedy options without stop tokens.
pub fn options(strategy: Strategy, max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions::new(strategy).with_max_new_tokens(max_new_tokens)
}

/// One generation with a fresh generator of capacity 96.
pub fn run<B: LayerSkipBackend>(
    model: &LlamaModel<B>,
    prompt: &[u32],
    options: &GenerateOptions,
) -> Generation {
    Generator::new(model, 96)
        .unwrap()
        .generate(prompt, options, |_| true)
        .unwrap()
}

/// Greedy self-speculation against autoregressive decoding on `model`, allowing a divergence
/// only where the full model's two best logits are within `precision`'s tie tolerance (its
/// batched verification and one-token steps may round differently). Returns the number of ties.
pub fn greedy_grid<B: LayerSkipBackend>(
    model: &LlamaModel<B>,
    prompts: &[&[u32]],
    exits: &[usize],
    speculations: &[usize],
    new_tokens: usize,
    precision: Precision,
) -> usize {
    let mut generator = Generator::new(model, 96).unwrap();
    let mut ties = 0;
    for prompt in prompts {
        let ar = generator
            .generate(
                prompt,
                &options(Strategy::Autoregressive, new_tokens),
                |_| true,
            )
            .unwrap();
        assert_eq!(ar.tokens.len(), new_tokens);
        for &exit_layer in exits {
            for &speculations in speculations {
                let strategy = Strategy::SelfSpeculative {
                    exit_layer,
                    speculations,
                };
                let ss = generator
                    .generate(prompt, &options(strategy, new_tokens), |_| true)
                    .unwrap();
                let Some(pos) = first_difference(&ss.tokens, &ar.tokens) else {
                    continue;
                };
                let context: Vec<u32> = prompt.iter().chain(&ar.tokens[..pos]).copied().collect();
                let m = generator.next_token_margin(&context).unwrap();
                assert_eq!(m.first, ar.tokens[pos], "the margin is the AR token's");
                let tol = precision.tie_tolerance(m.scale);
                assert!(
                    m.margin <= tol,
                    "E={exit_layer} d={speculations} prompt {prompt:?}: diverges at {pos} where \
                     the full model's gap {} exceeds the {precision} tie tolerance {tol}",
                    m.margin
                );
                ties += 1;
            }
        }
    }
    ties
}

/// The first position where two token sequences differ (the shorter length when one is a prefix
/// of the other).
fn first_difference(a: &[u32], b: &[u32]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() == b.len() => None,
        None => Some(a.len().min(b.len())),
    }
}
