//! Decoding with weights kept in ggml's Q8_0 format (`prepare_for_decoding(Some(Q8_0))`) on the
//! Flex CPU backend, against an f32 model whose weights were replaced by their Q8_0 values
//! computed here by the format's definition.

use burn::backend::Flex;
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use layerskip_model::{KvCache, LlamaConfig, LlamaModel, Quantization, RopeConfig};

type B = Flex;

/// Every input width a whole number of 32-feature blocks; the vocabulary (70) tells the
/// embedding `[70, 64]` apart from the untied head `[64, 70]`.
fn config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 70,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope: RopeConfig {
            theta: 10_000.0,
            llama3_scaling: None,
        },
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

/// Q8_0 by its definition (ggml's `quantize_row_q8_0_ref` then dequantisation), for a weight
/// `[in, out]`: per output column and block of 32 inputs, `d = amax / 127`, `q = round(w / d)`
/// (half away from zero), and the value `f16(d) * q`.
fn q8_0_values(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; k * n];
    for c in 0..n {
        for b in 0..k / 32 {
            let rows = b * 32..(b + 1) * 32;
            let amax = rows.clone().map(|i| w[i * n + c].abs()).fold(0.0, f32::max);
            let d = amax / 127.0;
            let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
            let stored = half::f16::from_f32(d).to_f32();
            for i in rows {
                out[i * n + c] = stored * (w[i * n + c] * inv).round();
            }
        }
    }
    out
}

/// Replaces every 2-D weight but the embedding by its Q8_0 values.
struct ToQ8;
impl ModuleMapper<B> for ToQ8 {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|t| {
            let dims = t.dims();
            if D != 2 || dims[..] == [70, 64] {
                return t;
            }
            let (k, n) = (dims[0], dims[1]);
            let values = t.into_data().to_vec::<f32>().unwrap();
            let device = Default::default();
            Tensor::from_data(TensorData::new(q8_0_values(&values, k, n), dims), &device)
        })
    }
}

fn decode(model: &LlamaModel<B>, ids: &[i64]) -> Vec<Vec<f32>> {
    let device = Default::default();
    let mut cache = KvCache::new(model.config(), 1, 32, &device);
    let prefill = 4;
    let tokens = |ids: &[i64]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &device)
    };
    let mut out = vec![
        model
            .forward(tokens(&ids[..prefill]), 0, Some(&mut cache))
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap(),
    ];
    for (pos, &id) in ids.iter().enumerate().skip(prefill) {
        let logits = model.forward(tokens(&[id]), pos, Some(&mut cache)).unwrap();
        out.push(logits.into_data().to_vec::<f32>().unwrap());
    }
    out
}

/// The quantized model's logits, prompt and one token at a time, equal bit for bit those of the
/// f32 model holding the Q8_0 values (the kernels multiply each scale by its byte exactly and
/// sum in the f32 order), and differ from the unquantized model's.
#[test]
fn q8_0_decoding_computes_with_the_q8_0_values_bit_for_bit() {
    let device = Default::default();
    let init = || {
        B::seed(&device, 11);
        LlamaModel::<B>::init(&config(), &device).unwrap()
    };
    let model = init();
    // A model of its own (clones share their packed copies and their format).
    let reference = init().map(&mut ToQ8);
    let plain = decode(&model, &[3, 9, 27, 14, 5, 61, 2, 40]);
    model
        .prepare_for_decoding(Some(Quantization::Q8_0))
        .unwrap();
    // Preparing again without a format keeps the quantized copies.
    model.prepare_for_decoding(None).unwrap();
    let ids = [3, 9, 27, 14, 5, 61, 2, 40];
    let quantized = decode(&model, &ids);
    assert_eq!(quantized, decode(&reference, &ids));
    assert_ne!(quantized, plain);
    let gap = quantized
        .iter()
        .flatten()
        .zip(plain.iter().flatten())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(gap < 0.05, "Q8_0 moved a logit by {gap}");
}

/// Unknown formats are refused with the ones there are.
#[test]
fn quantization_names_parse() {
    assert_eq!("q8_0".parse::<Quantization>().unwrap(), Quantization::Q8_0);
    assert_eq!("Q8_0".parse::<Quantization>().unwrap(), Quantization::Q8_0);
    let err = "q3_k".parse::<Quantization>().unwrap_err().to_string();
    assert!(err.contains("expected q8_0"), "{err}");
}
