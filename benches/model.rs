//! Criterion benches of the model on SmolLM2-135M-shaped layers (30 layers, hidden 576, GQA 9/3,
//! vocab 49152; random weights, so nothing is downloaded): one prefill of 128 tokens, one decode
//! step at a context of 128 through the full model and through an early exit at layer 8, and one
//! through the full model at a context of 1024.
//!
//! `smollm2-shaped/verify_4_rows_30_layers` is the same model's pass over 4 new rows (verifying
//! 3 drafts). The `default-model` group loads the model shipped in `models/default` and times one pass
//! through all its layers plus the exit head over 1, 2, 3, 4, 5 and 8 new rows at a context of 128: the
//! cost of verifying `d + 1` rows against one-token decoding, which decides whether
//! self-speculation can pay.
//!
//! `cargo bench --bench model` prints the figures; `cargo test --benches` runs each once.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use criterion::{Criterion, criterion_group, criterion_main};
use layerskip_benches::smollm2_shaped;
use layerskip_model::{KvCache, LlamaModel};

type B = Flex;

fn bench_model(c: &mut Criterion) {
    let device = Default::default();
    B::seed(&device, 0);
    let config = smollm2_shaped();
    let model = LlamaModel::<B>::init(&config, &device).unwrap();
    let prompt: Vec<u32> = (0..128).map(|i| (i * 7919 % 49152) as u32).collect();
    let mut cache = KvCache::new(&config, 1, 512, &device);

    let mut group = c.benchmark_group("smollm2-shaped");
    group.sample_size(10);
    group.bench_function("prefill_128", |b| {
        b.iter(|| {
            cache.clear();
            let x = model
                .forward_layers(model.embed_ids(&prompt), 0..30, 0, Some(&mut cache))
                .unwrap();
            // Only the last position's logits are needed to start decoding.
            let last = x.slice([0..1, 127..128]);
            model.exit_head(last).into_data()
        })
    });
    cache.clear();
    model
        .forward_layers(model.embed_ids(&prompt), 0..30, 0, Some(&mut cache))
        .unwrap();
    for (name, exit) in [
        ("decode_step_full_30_layers", 30),
        ("decode_step_exit_8", 8),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                cache.truncate(128);
                let x = model
                    .forward_layers(model.embed_ids(&[42]), 0..exit, 128, Some(&mut cache))
                    .unwrap();
                model.exit_head(x).argmax(2).into_data()
            })
        });
    }
    // Verifying 3 drafts: the same pass over 4 new rows. On a model whose weights do not fit in
    // the CPU cache this costs little more than one row, unlike the default model's.
    group.bench_function("verify_4_rows_30_layers", |b| {
        b.iter(|| {
            cache.truncate(128);
            let x = model
                .forward_layers(
                    model.embed_ids(&[42, 43, 44, 45]),
                    0..30,
                    128,
                    Some(&mut cache),
                )
                .unwrap();
            model.exit_head(x).argmax(2).into_data()
        })
    });
    // A decode step deep into a generation, where attention over the cache is a large part of
    // the step (at 128 positions it is a small one).
    let long: Vec<u32> = (0..1024).map(|i| (i * 7919 % 49152) as u32).collect();
    let mut long_cache = KvCache::new(&config, 1, 1100, &device);
    model
        .forward_layers(model.embed_ids(&long), 0..30, 0, Some(&mut long_cache))
        .unwrap();
    group.bench_function("decode_step_full_30_layers_context_1024", |b| {
        b.iter(|| {
            long_cache.truncate(1024);
            let x = model
                .forward_layers(model.embed_ids(&[42]), 0..30, 1024, Some(&mut long_cache))
                .unwrap();
            model.exit_head(x).argmax(2).into_data()
        })
    });
    group.finish();
}

fn bench_default_model(c: &mut Criterion) {
    let device = Default::default();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/default");
    let model = LlamaModel::<B>::from_pretrained(std::path::Path::new(dir), &device).unwrap();
    let config = model.config().clone();
    let layers = config.num_layers;
    let prompt: Vec<u32> = (0..128).map(|i| (i * 31 % 4096) as u32).collect();
    let mut cache = KvCache::new(&config, 1, 256, &device);
    model
        .forward_layers(model.embed_ids(&prompt), 0..layers, 0, Some(&mut cache))
        .unwrap();
    let mut group = c.benchmark_group("default-model");
    group.sample_size(20);
    for rows in [1usize, 2, 3, 4, 5, 8] {
        let ids: Vec<u32> = (0..rows as u32).map(|i| 100 + i).collect();
        group.bench_function(format!("pass_{rows}_rows"), |b| {
            b.iter(|| {
                cache.truncate(128);
                let x = model
                    .forward_layers(model.embed_ids(&ids), 0..layers, 128, Some(&mut cache))
                    .unwrap();
                model.exit_head(x).argmax(2).into_data()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_model, bench_default_model);
criterion_main!(benches);
