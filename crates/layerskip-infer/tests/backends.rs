//! The generation code off the default path: half-precision compute on Flex (bf16), and the wgpu
//! backend (`--features wgpu`; CI runs it on Mesa's software Vulkan driver, lavapipe).
//!
//! A device's compute dtype is set once per process before its first tensor, so the bf16 Flex
//! tests live in this binary and every one of them goes through [`bf16_device`].

use std::sync::Once;

use burn::backend::Flex;
use burn::tensor::DType;
use layerskip_infer::{Generator, Strategy};
use layerskip_model::backend::Precision;

mod common;
use common::{config, greedy_grid, options, random_model_on, run};

fn bf16_device() -> burn::backend::flex::FlexDevice {
    static INIT: Once = Once::new();
    let device = Default::default();
    INIT.call_once(|| Precision::Bf16.apply::<Flex>(&device).unwrap());
    device
}

/// bf16 compute: weights, activations and the KV cache really are bf16, and greedy
/// self-speculation equals autoregressive decoding except at rounding ties (a divergence where
/// the full model's two best logits are further apart than 16 bf16 rounding units of the logit
/// scale fails the test).
#[test]
fn flex_bf16_self_speculation_equals_autoregressive_up_to_rounding_ties() {
    let device = bf16_device();
    assert_eq!(Precision::of_device::<Flex>(&device), Precision::Bf16);
    let model = random_model_on::<Flex>(11, &config(6, 40, 2, false), &device);
    let generator = Generator::new(&model, 96).unwrap();
    // 6 layers x 2 (K, V) x 96 positions x 2 kv heads x 8 dims x 2 bytes.
    assert_eq!(generator.cache().allocated_bytes(), 6 * 2 * 96 * 2 * 8 * 2);
    let ties = greedy_grid(
        &model,
        &[&[3], &[5, 9, 1, 33, 7, 2, 18]],
        &[1, 2, 3, 4, 5],
        &[1, 3, 5],
        24,
        Precision::Bf16,
    );
    eprintln!("bf16: 30 greedy comparisons, {ties} diverged at a rounding tie");
    let ee = run(
        &model,
        &[3],
        &options(Strategy::EarlyExit { exit_layer: 6 }, 24),
    );
    let ar = run(&model, &[3], &options(Strategy::Autoregressive, 24));
    assert_eq!(
        ee.tokens, ar.tokens,
        "early exit at E = L is the same computation"
    );
}

#[test]
fn flex_bf16_weights_are_bf16() {
    let device = bf16_device();
    let model = random_model_on::<Flex>(12, &config(2, 40, 2, true), &device);
    let hidden = model.embed_ids(&[1, 2, 3]);
    assert_eq!(hidden.dtype(), DType::BF16);
    let logits = model.exit_head(model.forward_layers(hidden, 0..2, 0, None).unwrap());
    assert_eq!(logits.dtype(), DType::BF16);
}

/// The same model code on Vulkan through wgpu. In CI this runs on Mesa's software rasteriser
/// (lavapipe), 30-60x slower than Flex, so the grid is smaller than the Flex one. Tolerance: a
/// divergence is allowed only at a rounding tie (gap <= 16 f32 rounding units of the logit scale, see
/// `Precision::tie_tolerance`); with std-0.15 random weights none is expected.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_greedy_self_speculation_equals_autoregressive() {
    use layerskip_model::backend::Precision;
    type W = burn::backend::Wgpu;
    let device = Default::default();
    let model = random_model_on::<W>(1, &config(4, 40, 2, false), &device);
    let ties = greedy_grid(
        &model,
        &[&[5, 9, 1, 33, 7]],
        &[1, 3],
        &[1, 3],
        16,
        Precision::F32,
    );
    eprintln!("wgpu: {ties} rounding ties");
    let ee = run(
        &model,
        &[3],
        &options(Strategy::EarlyExit { exit_layer: 4 }, 12),
    );
    let ar = run(&model, &[3], &options(Strategy::Autoregressive, 12));
    assert_eq!(ee.tokens, ar.tokens, "early exit at E = L");
}

/// Batched decoding on wgpu (what `layerskip serve` runs on a GPU): each of three generations
/// decoded together, one joining late, is token for token the generation alone (the CubeCL
/// product kernels compute each row alone). Adaptive self-speculation gives the greedy tokens.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_batched_and_adaptive_decoding_equal_each_generation_alone() {
    use layerskip_infer::{Batch, StreamEvent};
    type W = burn::backend::Wgpu;
    let device = Default::default();
    let model = random_model_on::<W>(2, &config(4, 40, 2, true), &device);
    let prompts: [&[u32]; 3] = [&[5, 9, 1, 33, 7], &[3], &[2, 4, 6]];
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| run(&model, p, &options(Strategy::Autoregressive, 10)).tokens)
        .collect();
    let mut batch = Batch::new(&model, 96, 4).unwrap();
    let mut got = vec![Vec::new(); 3];
    let ar = options(Strategy::Autoregressive, 10);
    let mut slots = Vec::new();
    for p in &prompts[..2] {
        slots.push(batch.admit(p, &ar, |_| true).unwrap());
    }
    let mut step = 0;
    while !batch.is_empty() || slots.len() < 3 {
        if step == 2 {
            slots.push(batch.admit(prompts[2], &ar, |_| true).unwrap());
        }
        batch.step(|_, _: StreamEvent<'_>| true).unwrap();
        for (slot, generation) in batch.take_finished() {
            let i = slots.iter().position(|&s| s == slot).unwrap();
            got[i] = generation.tokens;
        }
        step += 1;
        assert!(step < 40);
    }
    assert_eq!(got, want);
    let adaptive = run(
        &model,
        prompts[0],
        &options(
            Strategy::Adaptive {
                max_speculations: 3,
            },
            10,
        ),
    );
    assert_eq!(adaptive.tokens, want[0]);
}
