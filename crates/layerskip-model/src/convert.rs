//! GGUF (llama.cpp) Llama checkpoints to the Hugging Face layout: `config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`.
//!
//! llama.cpp stores the rows of `q_proj`/`k_proj` permuted for its interleaved rotary layout; this
//! converter undoes that so the result runs with rotate-half RoPE, like any Hugging Face Llama.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::checkpoint::{SaveDtype, TensorBytes, write_atomic, write_safetensors_atomic};
use crate::config::{HfLlamaConfig, LlamaConfig, RopeConfig};
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufValue};
use crate::ops::Quantization;

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The model configuration.
    pub config: LlamaConfig,
    /// Tensors written.
    pub tensors: usize,
    /// Whether a tokenizer was written.
    pub tokenizer: bool,
    /// The block format most of the file's layer weights were stored in, if a quantized one
    /// that decoding can keep (`--quantize`): the safetensors hold its dequantised values
    /// (re-quantizing them gives a Q8_0 or Q4_0 file's blocks back, see [`Quantization`]).
    pub quantized: Option<Quantization>,
}

/// Converts a GGUF Llama checkpoint into a Hugging Face checkpoint directory.
pub fn convert_gguf(gguf_path: &Path, out_dir: &Path, dtype: SaveDtype) -> Result<ConvertReport> {
    let gguf = GgufFile::open(gguf_path)?;
    let arch = gguf.require("general.architecture")?.as_str().unwrap_or("");
    if arch != "llama" {
        return Err(ModelError::Unsupported(format!(
            "{}: GGUF architecture {arch:?} (only llama)",
            gguf_path.display()
        )));
    }
    let config = gguf_config(&gguf)?;
    std::fs::create_dir_all(out_dir).map_err(|e| ModelError::io(out_dir, e))?;
    let tensors = gguf_tensors(&gguf, &config, dtype)?;
    let count = tensors.len();
    write_safetensors_atomic(&out_dir.join("model.safetensors"), tensors)?;
    let hf = config.to_hf(dtype.torch_name());
    let text = serde_json::to_string_pretty(&hf).expect("serialisable config");
    write_atomic(&out_dir.join("config.json"), text.as_bytes())?;
    let tokenizer = match gguf_tokenizer(&gguf)? {
        Some((tokenizer, tokenizer_config)) => {
            let text = serde_json::to_string(&tokenizer).expect("serialisable tokenizer");
            // Reject what the tokenizers crate cannot load before writing it.
            tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| {
                ModelError::parse(
                    gguf_path,
                    format!("tokenizer built from GGUF is invalid: {e}"),
                )
            })?;
            write_atomic(&out_dir.join("tokenizer.json"), text.as_bytes())?;
            let text = serde_json::to_string_pretty(&tokenizer_config).expect("serialisable");
            write_atomic(&out_dir.join("tokenizer_config.json"), text.as_bytes())?;
            true
        }
        None => false,
    };
    Ok(ConvertReport {
        config,
        tensors: count,
        tokenizer,
        quantized: layer_format(&gguf),
    })
}

/// The quantized format most `blk.*` tensors of the file are in, if any.
fn layer_format(g: &GgufFile) -> Option<Quantization> {
    let format = |ggml_type| match ggml_type {
        8 => Some(Quantization::Q8_0),
        2 => Some(Quantization::Q4_0),
        3 => Some(Quantization::Q4_1),
        _ => None,
    };
    let count = |q: Quantization| {
        g.tensors
            .iter()
            .filter(|(name, info)| name.starts_with("blk.") && format(info.ggml_type) == Some(q))
            .count()
    };
    [Quantization::Q8_0, Quantization::Q4_0, Quantization::Q4_1]
        .into_iter()
        .max_by_key(|&q| count(q))
        .filter(|&q| count(q) > 0)
}

fn gguf_config(g: &GgufFile) -> Result<LlamaConfig> {
    let int = |key: &str| -> Result<usize> {
        let v = g.require(key)?;
        v.as_int()
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::parse(g.path(), format!("{key} is not an integer")))
    };
    let vocab_size = match g.get("llama.vocab_size").and_then(GgufValue::as_int) {
        Some(v) => v as usize,
        None => g
            .require("tokenizer.ggml.tokens")?
            .as_array()
            .map_or(0, <[GgufValue]>::len),
    };
    let num_heads = int("llama.attention.head_count")?;
    let hidden_size = int("llama.embedding_length")?;
    let head_dim = match g
        .get("llama.rope.dimension_count")
        .and_then(GgufValue::as_int)
    {
        Some(d) => d as usize,
        None => hidden_size / num_heads.max(1),
    };
    let token = |key: &str| g.get(key).and_then(GgufValue::as_int).map(|v| v as u32);
    let hf_like = HfLlamaConfig {
        architectures: None,
        model_type: None,
        vocab_size,
        hidden_size,
        intermediate_size: int("llama.feed_forward_length")?,
        num_hidden_layers: int("llama.block_count")?,
        num_attention_heads: num_heads,
        num_key_value_heads: Some(int("llama.attention.head_count_kv").unwrap_or(num_heads)),
        head_dim: Some(head_dim),
        max_position_embeddings: int("llama.context_length")?,
        rms_norm_eps: g
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(GgufValue::as_float)
            .unwrap_or(1e-5),
        rope_theta: Some(
            g.get("llama.rope.freq_base")
                .and_then(GgufValue::as_float)
                .unwrap_or(10_000.0),
        ),
        rope_scaling: None,
        rope_parameters: None,
        tie_word_embeddings: !g.tensors.contains_key("output.weight"),
        hidden_act: None,
        attention_bias: None,
        mlp_bias: None,
        torch_dtype: None,
        dtype: None,
        bos_token_id: token("tokenizer.ggml.bos_token_id").map(crate::config::OneOrMany::One),
        eos_token_id: token("tokenizer.ggml.eos_token_id").map(crate::config::OneOrMany::One),
    };
    let mut config = hf_like.to_runtime().map_err(|e| e.in_file(g.path()))?;
    // GGUF stores f32 metadata; round theta/eps to what the f32 value meant.
    config.rope = RopeConfig {
        theta: (config.rope.theta as f32) as f64,
        ..config.rope
    };
    config.rms_norm_eps = format!("{:e}", config.rms_norm_eps as f32)
        .parse()
        .unwrap_or(config.rms_norm_eps);
    Ok(config)
}

/// Undoes llama.cpp's row permutation of q/k: GGUF row `(head, i, j)` is HF row `(head, j, i)`
/// for `i < head_dim / 2`, `j < 2`.
fn unpermute_rows(w: Vec<f32>, heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_dim + i * 2 + j) * cols;
                let dst = (h * head_dim + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn gguf_tensors(g: &GgufFile, c: &LlamaConfig, dtype: SaveDtype) -> Result<Vec<TensorBytes>> {
    let mut names: Vec<(String, String)> = vec![
        (
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
        ),
        ("output_norm.weight".into(), "model.norm.weight".into()),
    ];
    if !c.tie_word_embeddings {
        names.push(("output.weight".into(), "lm_head.weight".into()));
    }
    let per_layer = [
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
    ];
    for l in 0..c.num_layers {
        for (src, dst) in per_layer {
            names.push((
                format!("blk.{l}.{src}.weight"),
                format!("model.layers.{l}.{dst}.weight"),
            ));
        }
    }
    let (h, v, ffn) = (c.hidden_size, c.vocab_size, c.intermediate_size);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    // The row-major shape the config implies for each tensor (checked before any reshuffle).
    let expected = |name: &str| -> Vec<usize> {
        let kind = name.rsplit('.').nth(1).unwrap_or("");
        match kind {
            "token_embd" | "output" => vec![v, h],
            "attn_q" => vec![q, h],
            "attn_k" | "attn_v" => vec![kv, h],
            "attn_output" => vec![h, q],
            "ffn_gate" | "ffn_up" => vec![ffn, h],
            "ffn_down" => vec![h, ffn],
            _ => vec![h],
        }
    };
    names
        .into_iter()
        .map(|(src, dst)| {
            let shape = g.tensors.get(&src).map(|t| t.shape()).unwrap_or_default();
            let want = expected(&src);
            if g.tensors.contains_key(&src) && shape != want {
                return Err(ModelError::WrongShape {
                    path: g.path().to_path_buf(),
                    name: src,
                    expected: want,
                    found: shape,
                });
            }
            let mut values = g.dequantize(&src)?;
            let cols = shape.last().copied().unwrap_or(1);
            if src.ends_with("attn_q.weight") {
                values = unpermute_rows(values, c.num_heads, c.head_dim, cols);
            } else if src.ends_with("attn_k.weight") {
                values = unpermute_rows(values, c.num_kv_heads, c.head_dim, cols);
            }
            Ok(TensorBytes::new(dst, shape, &values, dtype))
        })
        .collect()
}

/// A Hugging Face `tokenizer.json` (byte-level BPE) and `tokenizer_config.json` from GGUF's
/// `tokenizer.ggml.*` metadata; `None` when the file carries no tokenizer.
fn gguf_tokenizer(g: &GgufFile) -> Result<Option<(Value, Value)>> {
    let Some(model) = g.get("tokenizer.ggml.model").and_then(GgufValue::as_str) else {
        return Ok(None);
    };
    if model != "gpt2" {
        return Err(ModelError::Unsupported(format!(
            "{}: GGUF tokenizer model {model:?} (only gpt2 byte-level BPE)",
            g.path().display()
        )));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        let arr = g.require(key)?.as_array().unwrap_or(&[]);
        Ok(arr
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect())
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
        .map(|a| a.iter().map(|v| v.as_int().unwrap_or(1)).collect())
        .unwrap_or_default();
    let vocab: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // Token type 3 is "control" (special) in llama.cpp's vocabulary.
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i) == Some(&3))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                             "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("gpt2");
    let pre_tokenizer = match pre {
        // llama.cpp's "smollm" pre-tokenizer splits every digit before the GPT-2 regex.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "gpt2" | "default" => byte_level.clone(),
        other => {
            return Err(ModelError::Unsupported(format!(
                "{}: GGUF pre-tokenizer {other:?}",
                g.path().display()
            )));
        }
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let token_name = |key: &str| {
        g.get(key)
            .and_then(GgufValue::as_int)
            .and_then(|i| tokens.get(i as usize))
            .cloned()
    };
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": g.get("tokenizer.ggml.add_bos_token") == Some(&GgufValue::Bool(true)),
        "bos_token": token_name("tokenizer.ggml.bos_token_id"),
        "eos_token": token_name("tokenizer.ggml.eos_token_id"),
        "unk_token": token_name("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_name("tokenizer.ggml.padding_token_id"),
    });
    if let Some(template) = g.get("tokenizer.chat_template").and_then(GgufValue::as_str) {
        tokenizer_config["chat_template"] = Value::String(template.into());
    }
    Ok(Some((tokenizer, tokenizer_config)))
}

#[cfg(test)]
mod tests {
    use super::unpermute_rows;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2); rows of HF head h are
        // [a0 a1 a2 | b0 b1 b2] (hd = 6), stored as [a0 b0 a1 b1 a2 b2].
        let heads = 2;
        let hf: Vec<f32> = (0..12).map(|r| r as f32).collect(); // one column per row
        let mut gguf = vec![0.0; 12];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..3 {
                    gguf[h * 6 + i * 2 + j] = hf[h * 6 + j * 3 + i];
                }
            }
        }
        assert_eq!(gguf[..6], [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(unpermute_rows(gguf, heads, 6, 1), hf);
    }
}
