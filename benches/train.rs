//! Criterion: one training step (forward with exits, backward, AdamW) of an 8-layer, width-256
//! model (the shape of `configs/pretrain_from_scratch.toml`) on batches of 8 x 128 tokens, with
//! layer dropout off and at p_max = 0.5 (uniform over time, exponential over layers). Dropped rows
//! are not computed, so the step gets cheaper; the tokens/s of both are printed. A third case runs
//! bf16 mixed precision without dropout: on Flex the products take bf16 operands (AVX512-BF16's
//! products where the CPU has them, else the f32 GEMM on rounded operands) while every tensor and
//! the master weights stay f32.

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use criterion::{Criterion, criterion_group, criterion_main};
use layerskip_model::LlamaModel;
use layerskip_train::{Blocks, TrainConfig, Trainer};

type B = Autodiff<Flex>;

fn trainer(p_max: f64, mixed_precision: &str) -> Trainer<B> {
    let text = format!(
        "steps = 1000000\n[data]\nseq_len = 128\n[optim]\nlr = 1e-3\nbatch_size = 8\n\
         mixed_precision = \"{mixed_precision}\"\n\
         [layer_dropout]\np_max = {p_max}\n[early_exit]\ne_scale = 0.2\ncurriculum = {{ type = \"rotational\", period = 4 }}\n"
    );
    let config: TrainConfig = toml::from_str(&text).unwrap();
    // The from-scratch preset's shape (the first default model's), so that figures stay
    // comparable from round to round.
    let preset = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/pretrain_from_scratch.toml"
    );
    let shape = TrainConfig::from_file(std::path::Path::new(preset))
        .unwrap()
        .model
        .unwrap();
    let llama = shape.llama_config(shape.vocab_size, vec![0]);
    let device = Default::default();
    B::seed(&device, 0);
    let model = LlamaModel::init(&llama, &device).unwrap();
    // Synthetic token blocks: the cost of a step does not depend on the text.
    let tokens: Vec<Vec<u32>> = (0..64)
        .map(|b| {
            (0..129)
                .map(|i| ((b * 131 + i * 17) % 4096) as u32)
                .collect()
        })
        .collect();
    let blocks = Blocks {
        mask: vec![vec![1.0; 128]; 64],
        tokens,
        seq_len: 128,
    };
    Trainer::new(config, model, blocks.clone(), blocks, device).unwrap()
}

fn bench_train_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step_8x128");
    group.sample_size(10);
    for (label, p, precision) in [
        ("no_layer_dropout", 0.0, "off"),
        ("layer_dropout_p0.5", 0.5, "off"),
        ("bf16_mixed_precision", 0.0, "bf16"),
    ] {
        let mut t = trainer(p, precision);
        let start = Instant::now();
        let (mut tokens, mut skipped) = (0, 0.0);
        for _ in 0..5 {
            let r = t.train_step().unwrap();
            tokens += r.tokens;
            skipped += r.skipped_fraction / 5.0;
        }
        println!(
            "{label}: {:.0} tokens/s over 5 steps, {:.0}% of (layer, sequence) pairs skipped",
            tokens as f64 / start.elapsed().as_secs_f64(),
            100.0 * skipped
        );
        group.bench_function(label, |b| b.iter(|| t.train_step().unwrap().loss));
    }
    group.finish();
}

criterion_group!(benches, bench_train_step);
criterion_main!(benches);
