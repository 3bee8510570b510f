//! Bad input gets a clear error that names the file and the problem, never a panic; and the
//! Hugging Face config mirror accepts every spelling the released checkpoints use.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use layerskip_model::{HfLlamaConfig, LlamaConfig, LlamaModel, ModelError, SaveDtype};

type B = Flex;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny")
        .join(name)
}

/// A scratch copy of a fixture checkpoint that a test may damage.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("layerskip-err-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("gqa_untied").join(f), dir.join(f)).unwrap();
    }
    dir
}

fn load(dir: &Path) -> ModelError {
    LlamaModel::<B>::from_pretrained(dir, &Default::default()).unwrap_err()
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut json);
    std::fs::write(path, json.to_string()).unwrap();
}

#[test]
fn missing_directory_and_files() {
    let err = load(Path::new("/nonexistent/model"));
    assert!(err.to_string().contains("/nonexistent/model"), "{err}");
    let dir = scratch("missing");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load(&dir);
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load(&dir);
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn malformed_and_unsupported_configs() {
    let dir = scratch("config");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    assert!(matches!(load(&dir), ModelError::Parse { .. }));
    std::fs::copy(
        fixture("gqa_untied").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    edit_config(&dir, |c| c["model_type"] = "mistral".into());
    let err = load(&dir);
    assert!(
        err.to_string().contains("mistral") && err.to_string().contains("config.json"),
        "{err}"
    );
    std::fs::copy(
        fixture("gqa_untied").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    edit_config(&dir, |c| c["num_key_value_heads"] = 3.into());
    let err = load(&dir);
    assert!(
        err.to_string().contains("multiple of num_key_value_heads"),
        "{err}"
    );
}

#[test]
fn wrong_shape_missing_tensor_and_bad_dtype() {
    let dir = scratch("tensors");
    // The config says 64 intermediate units; pretend it is 65.
    edit_config(&dir, |c| c["intermediate_size"] = 65.into());
    match load(&dir) {
        ModelError::WrongShape {
            name,
            expected,
            found,
            ..
        } => {
            assert!(name.contains("mlp"), "{name}");
            assert_ne!(expected, found);
        }
        other => panic!("expected WrongShape, got {other}"),
    }
    // An untied head that is not on disk.
    let dir = scratch("missing-tensor");
    edit_config(&dir, |c| c["num_hidden_layers"] = 4.into());
    match load(&dir) {
        ModelError::MissingTensor { name, .. } => {
            assert_eq!(name, "model.layers.3.self_attn.q_proj.weight")
        }
        other => panic!("expected MissingTensor, got {other}"),
    }
    // An int8 tensor.
    let dir = scratch("dtype");
    let bytes = vec![0u8; 32 * 96];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I8, vec![96, 32], &bytes).unwrap();
    safetensors::serialize_to_file(
        [("model.embed_tokens.weight", view)],
        None,
        &dir.join("model.safetensors"),
    )
    .unwrap();
    let err = load(&dir);
    assert!(matches!(err, ModelError::UnsupportedDtype { .. }), "{err}");
    // Not a safetensors file at all.
    std::fs::write(dir.join("model.safetensors"), b"garbage").unwrap();
    let err = load(&dir);
    assert!(err.to_string().contains("not a safetensors file"), "{err}");
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    // Split the fixture into two shards with an index, as large checkpoints ship.
    let dir = scratch("sharded");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<_> = chunk
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = LlamaModel::<B>::from_pretrained(&dir, &Default::default()).unwrap();
    let single =
        LlamaModel::<B>::from_pretrained(&fixture("gqa_untied"), &Default::default()).unwrap();
    let ids = [3u32, 1, 4, 1, 5];
    let (a, b) = (
        sharded.exit_head(sharded.embed_ids(&ids)),
        single.exit_head(single.embed_ids(&ids)),
    );
    assert_eq!((a - b).abs().max().into_scalar(), 0.0);
}

/// The config of facebook/layerskip-llama3.2-1B as published (transformers 4 spelling).
const LLAMA32_1B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "transformers_version": "4.45.0", "use_cache": true, "vocab_size": 128256
}"#;

#[test]
fn llama32_config_with_rope_scaling_and_eos_list() {
    let hf: HfLlamaConfig = serde_json::from_str(LLAMA32_1B).unwrap();
    let c = hf.to_runtime().unwrap();
    assert_eq!(
        (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
        (16, 32, 8, 64)
    );
    assert_eq!(c.rope.theta, 500000.0);
    let s = c.rope.llama3_scaling.expect("llama3 scaling");
    assert_eq!((s.factor, s.original_max_position_embeddings), (32.0, 8192));
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(c.bos_token_id, Some(128000));
    assert!(c.tie_word_embeddings);
    // What we write back reads as the same runtime config.
    let back: HfLlamaConfig =
        serde_json::from_str(&serde_json::to_string(&c.to_hf("bfloat16")).unwrap()).unwrap();
    assert_eq!(back.to_runtime().unwrap(), c);
}

#[test]
fn config_defaults_and_rejections() {
    // Llama 2 style: no head_dim, no num_key_value_heads, no rope settings, int eos.
    let json = r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 100, "eos_token_id": 2}"#;
    let c = serde_json::from_str::<HfLlamaConfig>(json)
        .unwrap()
        .to_runtime()
        .unwrap();
    assert_eq!((c.head_dim, c.num_kv_heads, c.rope.theta), (16, 4, 10000.0));
    assert_eq!(c.eos_token_ids, vec![2]);
    let bad = json.replace("\"eos_token_id\": 2", "\"eos_token_id\": 100");
    assert!(
        serde_json::from_str::<HfLlamaConfig>(&bad)
            .unwrap()
            .to_runtime()
            .is_err()
    );
    let yarn = json.replace(
        "}",
        r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
    );
    let err = serde_json::from_str::<HfLlamaConfig>(&yarn)
        .unwrap()
        .to_runtime()
        .unwrap_err();
    assert!(err.to_string().contains("yarn"), "{err}");
    let c = LlamaConfig { num_layers: 0, ..c };
    assert!(c.validate().is_err());
}

#[test]
fn save_is_atomic_and_leaves_no_temporary_files() {
    let dir = std::env::temp_dir().join(format!("layerskip-atomic-{}", std::process::id()));
    let m =
        LlamaModel::<B>::from_pretrained(&fixture("mha_tied_f16"), &Default::default()).unwrap();
    m.save_pretrained(&dir, SaveDtype::F16).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
    // f16 -> f32 -> f16 is exact: the saved file equals the one transformers wrote, tensor by tensor.
    let ours = std::fs::read(dir.join("model.safetensors")).unwrap();
    let theirs = std::fs::read(fixture("mha_tied_f16").join("model.safetensors")).unwrap();
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&ours).unwrap(),
        safetensors::SafeTensors::deserialize(&theirs).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (name, view) in b.tensors() {
        assert_eq!(a.tensor(&name).unwrap().data(), view.data(), "{name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
