//! Decoding with weights kept in ggml's block formats (`prepare_for_decoding(Some(format))`) on
//! the Flex CPU backend, against an f32 model whose weights were replaced by the format's values
//! computed here by its definition.

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

/// A block format by its definition (ggml's `quantize_row_*_ref`, then dequantisation), for a
/// weight `[in, out]`: per output column and block of 32 inputs,
/// - Q8_0: `d = amax / 127`, `q = round(w / d)`, value `f16(d) * q`;
/// - Q4_0: `d = (value of largest magnitude) / -8`, `q = min(15, trunc(w / d + 8.5))`, value
///   `(q - 8) * f16(d)`;
/// - Q4_1: `d = (max - min) / 15`, `q = min(15, trunc((w - min) / d + 0.5))`, value
///   `q * f16(d) + f16(min)`.
fn format_values(format: Quantization, w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
    let mut out = vec![0.0; k * n];
    for c in 0..n {
        for b in 0..k / 32 {
            let rows: Vec<usize> = (b * 32..(b + 1) * 32).collect();
            let block: Vec<f32> = rows.iter().map(|&i| w[i * n + c]).collect();
            let values: Vec<f32> = match format {
                Quantization::Q8_0 => {
                    let d = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                    block.iter().map(|v| f16(d) * (v * inv).round()).collect()
                }
                Quantization::Q4_0 => {
                    let extreme = block
                        .iter()
                        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let d = extreme / -8.0;
                    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                    block
                        .iter()
                        .map(|v| (((v * inv + 8.5) as i32).min(15) - 8) as f32 * f16(d))
                        .collect()
                }
                Quantization::Q4_1 => {
                    let min = block.iter().fold(f32::MAX, |m, &v| m.min(v));
                    let max = block.iter().fold(-f32::MAX, |m, &v| m.max(v));
                    let d = (max - min) / 15.0;
                    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                    block
                        .iter()
                        .map(|v| {
                            (((v - min) * inv + 0.5) as i32).min(15) as f32 * f16(d) + f16(min)
                        })
                        .collect()
                }
            };
            for (i, v) in rows.into_iter().zip(values) {
                out[i * n + c] = v;
            }
        }
    }
    out
}

/// Replaces every 2-D weight but the embedding by its values in a block format.
struct ToFormat(Quantization);
impl ModuleMapper<B> for ToFormat {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let format = self.0;
        param.map(|t| {
            let dims = t.dims();
            if D != 2 || dims[..] == [70, 64] {
                return t;
            }
            let (k, n) = (dims[0], dims[1]);
            let values = t.into_data().to_vec::<f32>().unwrap();
            let device = Default::default();
            let values = format_values(format, &values, k, n);
            Tensor::from_data(TensorData::new(values, dims), &device)
        })
    }
}

/// A model initialised from `seed`. Parameters draw their values when first read, from the
/// backend's global generator: they are all read here, in module order, while tests running
/// at the same time wait their turn.
fn seeded(seed: u64, config: &LlamaConfig) -> LlamaModel<B> {
    struct Touch;
    impl ModuleMapper<B> for Touch {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            p.map(|t| t)
        }
    }
    static SEEDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = SEEDING.lock().unwrap_or_else(|e| e.into_inner());
    let device = Default::default();
    B::seed(&device, seed);
    LlamaModel::<B>::init(config, &device)
        .unwrap()
        .map(&mut Touch)
}

fn decode(model: &LlamaModel<B>, ids: &[i64]) -> Vec<Vec<f32>> {
    decode_from(model, ids, 4)
}

/// The logits of `ids`, the first `prefill` in one call, then one at a time.
fn decode_from(model: &LlamaModel<B>, ids: &[i64], prefill: usize) -> Vec<Vec<f32>> {
    let device = Default::default();
    let mut cache = KvCache::new(model.config(), 1, 32, &device);
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

/// For each format, the quantized model's logits, prompt and one token at a time, are those of
/// the model holding the format's values computed here (its weights re-quantize to the same
/// blocks: equal bit for bit), and differ from that model's f32 products only by the rounding of
/// the activations to 8 bits per block of 32 (as llama.cpp computes with these formats): less
/// than quantizing the weights moved them from the unquantized model's (the same 8 bits for
/// Q8_0, a quarter of it for the 4-bit formats); a prompt decoded
/// one token at a time gives the logits of the prompt at once (each row quantized on its own).
#[test]
fn quantized_decoding_computes_with_the_formats_values() {
    let init = || seeded(11, &config());
    let ids = [3, 9, 27, 14, 5, 61, 2, 40];
    let plain = decode(&init(), &ids);
    let gap = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
    };
    for (format, bound, activations, share) in [
        (Quantization::Q8_0, 0.05, 0.01, 1.0),
        (Quantization::Q4_0, 0.5, 0.02, 0.25),
        (Quantization::Q4_1, 0.5, 0.02, 0.25),
    ] {
        let model = init();
        model.prepare_for_decoding(Some(format)).unwrap();
        // Preparing again without a format keeps the quantized copies.
        model.prepare_for_decoding(None).unwrap();
        // A model of its own (clones share their packed copies and their format).
        let values = init().map(&mut ToFormat(format));
        let quantized = decode(&model, &ids);
        assert_ne!(quantized, plain, "{format}");
        let weights = gap(&quantized, &plain);
        assert!(weights < bound, "{format} moved a logit by {weights}");
        let in_f32 = decode(&values, &ids);
        let rounding = gap(&quantized, &in_f32);
        assert!(
            rounding > 0.0 && rounding < activations && rounding < weights * share,
            "{format}: activations moved a logit by {rounding} (weights: {weights})"
        );
        values.prepare_for_decoding(Some(format)).unwrap();
        assert_eq!(quantized, decode(&values, &ids), "{format}");
        let one_by_one = decode_from(&model, &ids, 1);
        let rows: Vec<f32> = quantized.iter().flatten().copied().collect();
        assert_eq!(one_by_one.concat(), rows, "{format}");
    }
}

/// Unknown formats are refused with the ones there are.
#[test]
fn quantization_names_parse() {
    assert_eq!("q8_0".parse::<Quantization>().unwrap(), Quantization::Q8_0);
    assert_eq!("Q8_0".parse::<Quantization>().unwrap(), Quantization::Q8_0);
    let err = "q3_k".parse::<Quantization>().unwrap_err().to_string();
    assert!(err.contains("expected q8_0, q4_0 or q4_1"), "{err}");
    assert_eq!("q4_1".parse::<Quantization>().unwrap(), Quantization::Q4_1);
}

/// The embedding `[70, 64]` of a tied model replaced by the values the tied head holds in a
/// block format (blocks of 32 along each token's row, as the head `[64, 70]` reads it).
struct TiedEmbeddingToFormat(Quantization);
impl ModuleMapper<B> for TiedEmbeddingToFormat {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let format = self.0;
        param.map(|t| {
            if t.dims()[..] != [70, 64] {
                return t;
            }
            let values = t.into_data().to_vec::<f32>().unwrap();
            let head: Vec<f32> = (0..64 * 70)
                .map(|e| values[(e % 70) * 64 + e / 70])
                .collect();
            let head = format_values(format, &head, 64, 70);
            let rows: Vec<f32> = (0..70 * 64).map(|e| head[(e % 64) * 70 + e / 64]).collect();
            Tensor::from_data(TensorData::new(rows, [70, 64]), &Default::default())
        })
    }
}

/// A decoding-only model (each weight's loaded copy freed once packed) decodes as the model
/// that keeps both: bit for bit in f32 and in every format, untied and tied. A tied model's
/// token lookup then reads the head's packed copy: in f32 the embedding's own values, in a
/// block format the values the head holds (what the model holding the format's values, one
/// matrix for both, computes once quantized; as llama.cpp's lookup of a quantized token
/// embedding).
#[test]
fn a_decoding_only_model_decodes_as_the_model_holding_both_copies() {
    let ids = [3, 9, 27, 14, 5, 61, 2, 40];
    for tied in [false, true] {
        let config = LlamaConfig {
            tie_word_embeddings: tied,
            ..config()
        };
        let init = || seeded(12, &config);
        let plain = init();
        let expected = decode(&plain, &ids);
        let released = init().into_decoding_only(None).unwrap();
        assert!(released.is_decoding_only());
        assert_eq!(decode(&released, &ids), expected, "f32, tied {tied}");
        // Token lookup from the packed head: the embedding's rows exactly.
        let rows = |m: &LlamaModel<B>| m.embed_ids(&[0, 69, 7]).into_data().to_vec::<f32>();
        assert_eq!(rows(&released).unwrap(), rows(&plain).unwrap());
        for format in [Quantization::Q8_0, Quantization::Q4_0, Quantization::Q4_1] {
            let quantized = init().into_decoding_only(Some(format)).unwrap();
            let mut reference = init().map(&mut ToFormat(format));
            if tied {
                reference = reference.map(&mut TiedEmbeddingToFormat(format));
            }
            reference.prepare_for_decoding(Some(format)).unwrap();
            assert_eq!(
                decode(&quantized, &ids),
                decode(&reference, &ids),
                "{format}, tied {tied}"
            );
        }
    }
}

/// What a decoding-only model cannot do is refused: saving (its weights are not there to
/// write), training; casting panics.
#[test]
fn a_decoding_only_model_refuses_to_be_saved_or_trained() {
    let device = Default::default();
    let model = seeded(14, &config()).into_decoding_only(None).unwrap();
    let dir = std::env::temp_dir().join(format!("layerskip-decoding-only-{}", std::process::id()));
    let err = model
        .save_pretrained(&dir, layerskip_model::SaveDtype::F32)
        .unwrap_err();
    assert!(err.to_string().contains("cannot be saved"), "{err}");
    assert!(!dir.join("model.safetensors").exists());
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 2, 3], [1, 3]), &device);
    let err = model.forward_train_hidden(tokens, &[0], None).unwrap_err();
    assert!(err.to_string().contains("cannot be trained"), "{err}");
    let cast = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.cast(burn::tensor::FloatDType::BF16)
    }));
    assert!(cast.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pass longer than the decode kernels' usual rows (a 600-token prompt: Burn's matmul over
/// the loaded weights otherwise) computes from the packed copy when it is the only one: the
/// same logits as the model that keeps both, to f32 rounding.
#[test]
fn a_decoding_only_model_runs_prompts_of_any_length() {
    let device = Default::default();
    let config = LlamaConfig {
        tie_word_embeddings: true,
        max_position_embeddings: 640,
        ..config()
    };
    let init = || seeded(13, &config);
    let ids: Vec<i64> = (0..600).map(|i| (i * 7 + 3) % 70).collect();
    let logits = |model: &LlamaModel<B>| {
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, 600]), &device);
        model
            .forward(tokens, 0, None)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    let plain = logits(&init());
    let released = logits(&init().into_decoding_only(None).unwrap());
    assert_eq!(plain.len(), released.len());
    let gap = plain
        .iter()
        .zip(&released)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(gap < 1e-4, "{gap}");
    assert!(released.iter().all(|v| v.is_finite()));
}

/// Loading for decoding only (each part packed and released as it is read) gives the model
/// that loading whole and then releasing gives, tied and untied, in f32 and in a block format.
#[test]
fn loading_for_decoding_only_equals_releasing_after_loading() {
    let device = Default::default();
    let ids = [3, 9, 27, 14, 5, 61, 2, 40];
    for tied in [false, true] {
        let config = LlamaConfig {
            tie_word_embeddings: tied,
            ..config()
        };
        let dir = std::env::temp_dir().join(format!(
            "layerskip-load-decoding-{}-{tied}",
            std::process::id()
        ));
        seeded(15, &config)
            .save_pretrained(&dir, layerskip_model::SaveDtype::F32)
            .unwrap();
        for format in [None, Some(Quantization::Q8_0)] {
            let loaded =
                LlamaModel::<B>::from_pretrained_for_decoding(&dir, &device, format).unwrap();
            assert!(loaded.is_decoding_only());
            let released = LlamaModel::<B>::from_pretrained(&dir, &device)
                .unwrap()
                .into_decoding_only(format)
                .unwrap();
            assert_eq!(
                decode(&loaded, &ids),
                decode(&released, &ids),
                "{format:?}, tied {tied}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
