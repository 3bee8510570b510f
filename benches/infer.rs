//! Criterion: one generation of 32 tokens per strategy on SmolLM2-135M (CPU, Flex), printed side
//! by side with the acceptance rate. Uses `models/smollm2-135m` when prepared
//! (`bash scripts/prepare_smollm2.sh`), else random SmolLM2-shaped weights.

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use criterion::{Criterion, criterion_group, criterion_main};
use layerskip_benches::smollm2_shaped;
use layerskip_infer::{GenerateOptions, Generator, Strategy};
use layerskip_model::{LlamaModel, Tokenizer};

type B = Flex;

const PROMPT: &str = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n";

/// The model, the prompt's token ids, and a name for the report.
fn load() -> (LlamaModel<B>, Vec<u32>, &'static str) {
    let device = Default::default();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m");
    if dir.join("model.safetensors").is_file() {
        let ids = Tokenizer::from_file(&dir).unwrap().encode(PROMPT).unwrap();
        return (
            LlamaModel::from_pretrained(&dir, &device).unwrap(),
            ids,
            "smollm2-135m",
        );
    }
    B::seed(&device, 0);
    let config = smollm2_shaped();
    // Random weights: any ids of the prompt's length will do.
    let ids = (0..20).map(|i| 100 + 37 * i).collect();
    (
        LlamaModel::init(&config, &device).unwrap(),
        ids,
        "random-smollm2-shaped",
    )
}

fn bench_strategies(c: &mut Criterion) {
    let (model, prompt, name) = load();
    let mut generator = Generator::new(&model, 512).unwrap();
    let mut group = c.benchmark_group(format!("generate32-{name}"));
    group.sample_size(10);
    for (label, strategy) in [
        ("autoregressive", Strategy::Autoregressive),
        ("early_exit_E8", Strategy::EarlyExit { exit_layer: 8 }),
        (
            "self_spec_E8_d4",
            Strategy::SelfSpeculative {
                exit_layer: 8,
                speculations: 4,
            },
        ),
        (
            "self_spec_E24_d4",
            Strategy::SelfSpeculative {
                exit_layer: 24,
                speculations: 4,
            },
        ),
    ] {
        let options = GenerateOptions::new(strategy).with_max_new_tokens(32);
        let g = generator.generate(&prompt, &options, |_| true).unwrap();
        println!(
            "{label}: {:.1} tokens/s, {:.1} ms/token, acceptance {}",
            g.stats.tokens_per_second(),
            g.stats.time_per_token_ms(),
            g.stats
                .acceptance_rate()
                .map_or("n/a".into(), |r| format!("{:.1}%", 100.0 * r))
        );
        group.bench_function(label, |b| {
            b.iter(|| {
                generator
                    .generate(&prompt, &options, |_| true)
                    .unwrap()
                    .tokens
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_strategies);
criterion_main!(benches);
