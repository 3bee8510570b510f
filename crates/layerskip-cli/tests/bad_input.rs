//! The binary against bad input that used to lose data or give wrong output: training over an
//! earlier run, a changed config on resume, checkpoints that drop tokenizer files, contexts too
//! short for the data, non-finite weights, configs and tokenizers that do not describe the weights.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::layerskip;

fn assert_error(code: i32, stderr: &str, needle: &str) {
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: ") && last.contains(needle),
        "expected an error containing {needle:?}, got:\n{stderr}"
    );
}

fn tmp(name: &str) -> common::Scratch {
    common::Scratch::new("bad", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn default_model() -> PathBuf {
    common::shipped_model()
}

/// A copy of the shipped model's files in a fresh directory, to damage.
fn copy_of_default_model(name: &str) -> common::Scratch {
    let dir = tmp(name);
    common::copy_shipped_model(&dir);
    dir
}

const TINY: &str = r#"
steps = 2
eval_every = 0
save_every = 0
[model]
vocab_size = 300
num_layers = 2
hidden_size = 32
intermediate_size = 64
num_heads = 2
num_kv_heads = 1
max_position_embeddings = 64
[data]
seq_len = 32
[optim]
lr = 1e-3
warmup_steps = 1
batch_size = 2
[early_exit]
e_scale = 1.0
"#;

/// Python source from the standard library (a single file: held-out text is cut from its end).
fn python_file() -> String {
    let out = Command::new("python3")
        .args(["-c", "import argparse; print(argparse.__file__)"])
        .output()
        .expect("python3 on the PATH");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn train(config: &Path, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let data = python_file();
    let mut args = vec![
        "train",
        "--config",
        s(config),
        "--data",
        &data,
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    layerskip(&args)
}

#[test]
fn a_fresh_run_never_replaces_an_earlier_one_and_a_resume_keeps_its_config() {
    let dir = tmp("runs");
    let config = dir.join("tiny.toml");
    std::fs::write(&config, TINY).unwrap();
    let out = dir.join("run");

    let (code, _, err) = train(&config, &out, &[]);
    assert_eq!(code, 0, "{err}");
    // Exits are numbered 1..L, as eval, infer and bench number them.
    assert!(
        err.contains("exit 1: ") && err.contains("exit 2: ") && !err.contains("L0"),
        "{err}"
    );
    let first = std::fs::read(out.join("checkpoint-000002/model.safetensors")).unwrap();

    // A second fresh run into the same directory is refused and leaves it untouched.
    let (code, _, err) = train(&config, &out, &["--steps", "3"]);
    assert_error(
        code,
        &err,
        "holds an earlier run (checkpoint-000002, latest)",
    );
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(
        std::fs::read(out.join("checkpoint-000002/model.safetensors")).unwrap(),
        first
    );

    // Resuming with another config lists every difference and changes nothing.
    let changed = dir.join("changed.toml");
    std::fs::write(
        &changed,
        TINY.replace("seq_len = 32", "seq_len = 16")
            .replace("lr = 1e-3", "lr = 2e-3"),
    )
    .unwrap();
    let (code, _, err) = train(&changed, &out, &["--resume", "--steps", "3"]);
    assert_error(
        code,
        &err,
        "data.seq_len: 32 -> 16; optim.lr: 0.001 -> 0.002",
    );
    assert!(!out.join("checkpoint-000003").exists());

    // The run's own config (given again, or not at all) resumes; --steps extends it.
    let (code, _, err) = train(&config, &out, &["--resume", "--steps", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("checkpoint-000003/optimizer.mpk").is_file());
    let data = python_file();
    let (code, _, err) = layerskip(&[
        "train",
        "--resume",
        "--out",
        s(&out),
        "--data",
        &data,
        "--steps",
        "4",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("latest")).unwrap(),
        "checkpoint-000004"
    );

    // --overwrite replaces the earlier run's checkpoints.
    let (code, _, err) = train(&config, &out, &["--overwrite"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("removed") && err.contains("checkpoint-000004"),
        "{err}"
    );
    assert!(!out.join("checkpoint-000004").exists());
    assert!(out.join("checkpoint-000002/model.safetensors").is_file());

    // A block longer than the model's context is refused before training.
    let long = dir.join("long.toml");
    std::fs::write(&long, TINY.replace("seq_len = 32", "seq_len = 128")).unwrap();
    let (code, _, err) = train(&long, &dir.join("run-long"), &[]);
    assert_error(
        code,
        &err,
        "data.seq_len = 128 is longer than the model's context",
    );
}

#[test]
fn checkpoints_carry_the_source_tokenizer_files_and_the_chat_template_survives() {
    let dir = tmp("chat");
    let config = dir.join("tiny.toml");
    std::fs::write(&config, TINY).unwrap();
    let (code, _, err) = train(&config, &dir.join("base"), &[]);
    assert_eq!(code, 0, "{err}");
    // Make the tiny checkpoint a "chat model" and fine-tune it one step.
    let chat_model = dir.join("base/checkpoint-000002");
    let tokenizer_config = r#"{"chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"}"#;
    std::fs::write(chat_model.join("tokenizer_config.json"), tokenizer_config).unwrap();
    let (code, _, err) = train(
        &config,
        &dir.join("tuned"),
        &["--model", s(&chat_model), "--steps", "1"],
    );
    assert_eq!(code, 0, "{err}");
    let tuned = dir.join("tuned/checkpoint-000001");
    assert_eq!(
        std::fs::read_to_string(tuned.join("tokenizer_config.json")).unwrap(),
        tokenizer_config
    );
    let (code, out, err) = layerskip(&[
        "infer",
        "--model",
        s(&tuned),
        "--chat",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"text\""), "{out}");
}

/// A copy of the shipped model whose tensor `name` holds `value` (bf16 bits) everywhere, or at
/// index `at` only.
fn damaged_model(dir_name: &str, name: &str, value: [u8; 2], at: Option<usize>) -> common::Scratch {
    use safetensors::SafeTensors;
    let dir = copy_of_default_model(dir_name);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let mut damaged = Vec::new();
    for (n, view) in tensors.tensors() {
        if n == name {
            let mut data = view.data().to_vec();
            match at {
                Some(i) => data[2 * i..2 * i + 2].copy_from_slice(&value),
                None => data
                    .chunks_exact_mut(2)
                    .for_each(|c| c.copy_from_slice(&value)),
            }
            damaged = data;
        }
    }
    assert!(!damaged.is_empty(), "no tensor {name}");
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .tensors()
        .into_iter()
        .map(|(n, view)| {
            if n == name {
                let view = safetensors::tensor::TensorView::new(
                    view.dtype(),
                    view.shape().to_vec(),
                    &damaged,
                )
                .unwrap();
                (n, view)
            } else {
                (n, view)
            }
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors.new")).unwrap();
    std::fs::rename(
        dir.join("model.safetensors.new"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    dir
}

#[test]
fn non_finite_weights_are_an_error_not_an_empty_generation() {
    // NaN weights (bf16 0x7fc0) are refused at load, by name: the final norm, a whole q_proj,
    // one value of a k_proj (NaN scores that attention's max and exp could otherwise hide).
    // Finite but huge weights (bf16's largest, 0x7f7f) overflow to non-finite logits, caught
    // while generating.
    let nan = [0xc0u8, 0x7f];
    let cases = [
        (
            "nan-norm",
            "model.norm.weight",
            nan,
            None,
            "tensor model.norm.weight holds a non-finite value (NaN at index 0)",
        ),
        (
            "nan-q",
            "model.layers.3.self_attn.q_proj.weight",
            nan,
            None,
            "tensor model.layers.3.self_attn.q_proj.weight holds a non-finite value",
        ),
        (
            "nan-k",
            "model.layers.1.self_attn.k_proj.weight",
            nan,
            Some(70),
            "tensor model.layers.1.self_attn.k_proj.weight holds a non-finite value (NaN at index 70)",
        ),
        (
            "huge-norm",
            "model.norm.weight",
            [0x7f, 0x7f],
            None,
            "non-finite logits",
        ),
    ];
    for (dir_name, tensor, value, at, message) in cases {
        let dir = damaged_model(dir_name, tensor, value, at);
        for extra in [
            &[][..],
            &["--temperature", "0.8", "--seed", "1"][..],
            &[
                "--strategy",
                "self-spec",
                "--exit-layer",
                "2",
                "--speculations",
                "3",
            ][..],
        ] {
            let mut args = vec!["infer", "--model", s(&dir), "--prompt", "def f(x):"];
            args.extend_from_slice(extra);
            let (code, out, err) = layerskip(&args);
            assert_error(code, &err, message);
            assert!(out.is_empty(), "{out}");
        }
    }
}

/// `convert` writes a model directory as a whole: it refuses an `--out` that holds files (a
/// model's, or any), naming them, and leaves it untouched; with `--overwrite` it replaces the
/// directory so that none of the old files stay beside the new model's; nothing half-written
/// or staged is left behind.
#[test]
fn convert_never_mixes_two_models_in_one_directory() {
    let m = default_model();
    let target = copy_of_default_model("convert-over");
    std::fs::write(target.join("LICENSE.md"), "the old model's license").unwrap();
    let config_before = std::fs::read(target.join("config.json")).unwrap();
    let (code, _, err) = layerskip(&[
        "convert",
        "--checkpoint",
        s(&m),
        "--out",
        s(&target),
        "--dtype",
        "f32",
    ]);
    assert_error(code, &err, "already holds files (");
    assert!(
        err.contains("config.json") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(target.join("config.json")).unwrap(),
        config_before
    );
    assert!(target.join("LICENSE.md").is_file());

    let (code, out, err) = layerskip(&[
        "convert",
        "--checkpoint",
        s(&m),
        "--out",
        s(&target),
        "--dtype",
        "f32",
        "--overwrite",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(s(&target)), "{out}");
    assert!(
        !target.join("LICENSE.md").exists(),
        "an old file stayed beside the new model"
    );
    assert!(target.join("model.safetensors").is_file() && target.join("tokenizer.json").is_file());
    // f32 weights: twice the bf16 file.
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(size(&target) > size(&m) * 3 / 2);
    let parent = target.parent().unwrap();
    let stray: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("convert-over") && n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    // A new directory is written whole, and an empty one is fine.
    let fresh_dir = tmp("convert-fresh");
    let fresh = fresh_dir.join("new/model");
    let (code, _, err) = layerskip(&[
        "convert",
        "--checkpoint",
        s(&m),
        "--out",
        s(&fresh),
        "--dtype",
        "bf16",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(fresh.join("config.json").is_file());
    let empty = tmp("convert-empty");
    let (code, _, err) = layerskip(&[
        "convert",
        "--checkpoint",
        s(&m),
        "--out",
        s(&empty),
        "--dtype",
        "bf16",
    ]);
    assert_eq!(code, 0, "{err}");
}

/// `train --model DIR` with a preset whose `[model]` describes another shape is refused, naming
/// each difference, rather than silently training the checkpoint's shape.
#[test]
fn train_from_a_model_refuses_a_preset_of_another_shape() {
    let dir = tmp("model-shape");
    let config = dir.join("tiny.toml");
    std::fs::write(&config, TINY).unwrap();
    let (code, _, err) = train(&config, &dir.join("base"), &[]);
    assert_eq!(code, 0, "{err}");
    let base = dir.join("base/checkpoint-000002");
    let other = TINY
        .replace("num_layers = 2", "num_layers = 3")
        .replace("hidden_size = 32", "hidden_size = 48");
    let other_config = dir.join("other.toml");
    std::fs::write(&other_config, other).unwrap();
    let (code, _, err) = train(
        &other_config,
        &dir.join("tuned"),
        &["--model", s(&base), "--steps", "1"],
    );
    assert_error(code, &err, "the preset's [model] differs from");
    assert!(
        err.contains("num_layers: 3 (preset) vs 2 (checkpoint)")
            && err.contains("hidden_size: 48 (preset) vs 32 (checkpoint)"),
        "{err}"
    );
    assert!(!dir.join("tuned/checkpoint-000001").exists());
}

#[test]
fn a_config_or_tokenizer_that_does_not_describe_the_weights_is_refused() {
    // config.json with fewer layers than the weights hold.
    let dir = copy_of_default_model("layers");
    let layers = common::shipped_config("num_hidden_layers");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = serde_json::json!(layers - 2);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let (code, _, err) = layerskip(&["infer", "--model", s(&dir), "--prompt", "x"]);
    assert_error(
        code,
        &err,
        &format!(
            "holds decoder layer {} but config.json says num_hidden_layers = {}",
            layers - 1,
            layers - 2
        ),
    );

    // A tokenizer with more tokens than the model has embeddings.
    let dir = copy_of_default_model("vocab");
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let added = tokenizer["added_tokens"].as_array_mut().unwrap();
    // The shipped tokenizer has as many tokens as the model has embeddings.
    let vocab = common::shipped_config("vocab_size");
    for id in vocab..vocab + 4 {
        added.push(
            serde_json::json!({"id": id, "content": format!("<extra_{id}>"),
            "single_word": false, "lstrip": false, "rstrip": false, "normalized": false,
            "special": true}),
        );
    }
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let (code, _, err) = layerskip(&["infer", "--model", s(&dir), "--prompt", "x"]);
    assert_error(
        code,
        &err,
        &format!(
            "the tokenizer has {} tokens but the model's vocab_size is {vocab}",
            vocab + 4
        ),
    );
}

/// Quantized weights live in the decoding kernels: an evaluation pass longer than they take,
/// and a format there is no kernel for, are refused instead of silently computing in f32.
#[test]
fn quantization_is_refused_where_it_would_not_apply() {
    let data = python_file();
    let model = default_model();
    let (code, _, err) = layerskip(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        &data,
        "--seq-len",
        "256",
        "--batch-size",
        "4",
        "--quantize",
        "q8_0",
    ]);
    assert_error(code, &err, "--batch-size 4 x --seq-len 256 = 1024");
    assert!(
        err.contains("which take at most 512 positions per pass: --batch-size"),
        "one message, one space between words: {err}"
    );
    let (code, _, err) = layerskip(&[
        "infer",
        "--model",
        s(&model),
        "--prompt",
        "x",
        "--quantize",
        "q4_k",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("unknown quantization \"q4_k\": expected q8_0, q4_0 or q4_1"),
        "{err}"
    );
}

#[test]
fn eval_refuses_empty_blocks_and_blocks_longer_than_the_context() {
    let data = python_file();
    let model = default_model();
    let context = common::shipped_config("max_position_embeddings");
    let (code, _, err) = layerskip(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        &data,
        "--seq-len",
        "0",
    ]);
    assert_error(code, &err, "--seq-len must be at least 1");
    let (code, _, err) = layerskip(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        &data,
        "--seq-len",
        &(2 * context).to_string(),
    ]);
    assert_error(code, &err, &format!("max_position_embeddings = {context}"));
}

#[test]
fn non_utf8_files_are_skipped_and_counted_by_train() {
    let dir = tmp("utf8");
    let config = dir.join("tiny.toml");
    std::fs::write(&config, TINY).unwrap();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(python_file(), data.join("a.py")).unwrap();
    std::fs::write(data.join("b.py"), [0xff_u8, 0xfe, 0x00, 0x41]).unwrap();
    let (code, _, err) = layerskip(&[
        "train",
        "--config",
        s(&config),
        "--data",
        s(&data),
        "--out",
        s(&dir.join("run")),
        "--steps",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("skipped 1 file(s) that are not UTF-8 text") && err.contains("b.py"),
        "{err}"
    );
}

#[test]
fn messages_name_the_problem_and_reports_say_what_happened() {
    let model = default_model();
    let m = s(&model);
    // A negative number is a value out of range, not an unknown flag.
    let (code, _, err) = layerskip(&[
        "infer",
        "--model",
        m,
        "--prompt",
        "x",
        "--strategy",
        "self-spec",
        "--exit-layer",
        "2",
        "--draft-confidence",
        "-1",
    ]);
    assert_error(code, &err, "draft confidence -1 is out of range");
    // --exit-layer means nothing to autoregressive decoding (named: a model's recorded
    // strategy, its layerskip.json, is the default).
    let (code, _, err) = layerskip(&[
        "infer",
        "--model",
        m,
        "--prompt",
        "x",
        "--strategy",
        "ar",
        "--exit-layer",
        "2",
    ]);
    assert_error(
        code,
        &err,
        "--exit-layer applies to --strategy early-exit and self-spec",
    );
    // ... nor to adaptive self-speculation, which chooses it.
    let adaptive = ["--strategy", "adaptive", "--exit-layer", "2"];
    let (code, _, err) =
        layerskip(&[&["infer", "--model", m, "--prompt", "x"], &adaptive[..]].concat());
    assert_error(
        code,
        &err,
        "--exit-layer does not apply to --strategy adaptive",
    );
    // convert names both of its sources.
    let (code, _, err) = layerskip(&["convert", "--out", "/tmp/layerskip-unused"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--gguf <GGUF>|--checkpoint <CHECKPOINT>"),
        "{err}"
    );
    // An output path that is a file.
    let dir = tmp("messages");
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (code, _, err) = layerskip(&["convert", "--checkpoint", m, "--out", s(&file)]);
    assert_error(code, &err, "a-file: exists and is not a directory");
    // An unsupported rotary scaling says so.
    let yarn = copy_of_default_model("yarn");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(yarn.join("config.json")).unwrap()).unwrap();
    config["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(yarn.join("config.json"), config.to_string()).unwrap();
    let (code, _, err) = layerskip(&["infer", "--model", s(&yarn), "--prompt", "x"]);
    assert_error(code, &err, "rope_type \"yarn\" is not supported");

    // Autoregressive decoding has no acceptance (null); the stop reason says whether the model
    // ended (the shipped model ends this function with EOS after 17 tokens), the budget ran
    // out, or a stop string came.
    let json_with = |max_new_tokens: &str, extra: &[&str]| {
        let mut args = vec![
            "infer",
            "--model",
            m,
            "--prompt",
            "def f(x):",
            "--max-new-tokens",
            max_new_tokens,
            "--json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = layerskip(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let json = |extra: &[&str]| json_with("24", extra);
    let ar = json(&["--strategy", "ar"]);
    assert!(ar["acceptance_rate"].is_null(), "{ar}");
    assert_eq!(ar["stop"], "StopToken", "{ar}");
    let ended = ar["stats"]["new_tokens"].as_u64().unwrap();
    assert!(ended < 24, "{ar}");
    let cut = json_with("4", &["--strategy", "ar"]);
    assert_eq!(cut["stop"], "MaxNewTokens", "{cut}");
    assert_eq!(cut["stats"]["new_tokens"], 4, "{cut}");
    let ss = json(&["--strategy", "self-spec", "--exit-layer", "4"]);
    assert!(ss["acceptance_rate"].as_f64().is_some(), "{ss}");
    // Adaptive self-speculation: the same text, and which exits it drafted from.
    let adaptive = json(&["--strategy", "adaptive"]);
    assert_eq!(adaptive["text"], ar["text"], "{adaptive}");
    assert!(adaptive["stats"]["exit_histogram"].is_array(), "{adaptive}");
    let text = ar["text"].as_str().unwrap();
    let stop: String = text.trim().chars().take(3).collect();
    let stopped = json(&["--stop", &stop]);
    assert_eq!(stopped["stop"], "StopString", "{stopped}");
    assert!(
        !stopped["text"].as_str().unwrap().contains(&stop),
        "{stopped}"
    );

    // bench: a template without {prompt}, and too few tokens for a per-token figure.
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "--model", m, "--num-samples", "1", "--warmup", "0"];
        args.extend_from_slice(extra);
        layerskip(&args)
    };
    let (code, _, err) = bench(&["--template", "hello"]);
    assert_error(code, &err, "has no {prompt}");
    let (code, _, err) = bench(&["--max-new-tokens", "0"]);
    assert_error(code, &err, "--max-new-tokens 0 is too few");
}

#[test]
fn eval_fraction_zero_trains_on_everything_without_held_out_text() {
    let dir = tmp("no-eval");
    let config = dir.join("tiny.toml");
    std::fs::write(
        &config,
        TINY.replace("seq_len = 32", "seq_len = 32\neval_fraction = 0.0"),
    )
    .unwrap();
    let (code, _, err) = train(&config, &dir.join("run"), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(" 0 held-out blocks"), "{err}");
    assert!(!err.contains("eval @"), "{err}");
    assert!(
        dir.join("run/checkpoint-000002/model.safetensors")
            .is_file()
    );
}

/// Arguments that cannot mean anything are refused by the parser (exit code 2), naming the flag.
#[test]
fn empty_and_zero_arguments_are_refused() {
    let m = default_model();
    let cases: [&[&str]; 4] = [
        &["infer", "--model", s(&m), "--prompt", "x", "--stop", ""],
        &["train", "--config", "x.toml", "--nodes", "0"],
        &["serve", "--model", s(&m), "--max-body-bytes", "0"],
        &["serve", "--model", s(&m), "--model-id", ""],
    ];
    for args in cases {
        let (code, _, err) = layerskip(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        let flag = args[args.len() - 2];
        assert!(
            err.contains(&format!("'{flag} "))
                && (err.contains("must not be empty") || err.contains("must be at least 1")),
            "{args:?}: {err}"
        );
    }
    // A tokenizer needs text: a data directory without any is refused, as train refuses it.
    let dir = tmp("empty-data");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let config = dir.join("tiny.toml");
    std::fs::write(&config, TINY).unwrap();
    let (code, _, err) = layerskip(&[
        "tokenizer",
        "--config",
        s(&config),
        "--data",
        s(&dir.join("data")),
        "--out",
        s(&dir.join("tok")),
    ]);
    assert_error(code, &err, "no text to train a tokenizer on");
    assert!(!dir.join("tok/tokenizer.json").exists());
}

/// Output that cannot be written, input without end and result paths that cannot be written
/// are one-line errors, before any long work where that can be known.
#[test]
fn unwritable_output_and_endless_input_are_errors_not_panics() {
    let m = default_model();
    for extra in [&[][..], &["--json"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_layerskip"))
            .args(
                [
                    &[
                        "infer",
                        "--model",
                        s(&m),
                        "--prompt",
                        "def f(x):",
                        "--max-new-tokens",
                        "4",
                    ],
                    extra,
                ]
                .concat(),
            )
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_error(
            out.status.code().unwrap_or(-1),
            &err,
            "No space left on device",
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, _, err) = layerskip(&[
        "infer",
        "--model",
        s(&m),
        "--prompt-file",
        "/dev/zero",
        "--context",
        "64",
    ]);
    assert_error(
        code,
        &err,
        "--prompt-file /dev/zero holds more than 16384 bytes",
    );
    let unwritable = tmp("unwritable");
    let missing = unwritable.join("no/such/dir/out.json");
    let data = python_file();
    let (code, _, err) = layerskip(&[
        "eval",
        "--model",
        s(&m),
        "--data",
        &data,
        "--seq-len",
        "64",
        "--max-blocks",
        "1",
        "--json",
        s(&missing),
    ]);
    assert_error(code, &err, "cannot write");
    assert!(
        err.contains("out.json") && err.contains("checked before the run"),
        "{err}"
    );
    let (code, _, err) = layerskip(&[
        "bench",
        "--model",
        s(&m),
        "--dataset",
        "humaneval",
        "--num-samples",
        "1",
        "--max-new-tokens",
        "2",
        "--json",
        s(&missing),
    ]);
    assert_error(code, &err, "checked before the run");
    let sweep_out = tmp("sweep-out");
    let file = sweep_out.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (code, _, err) = layerskip(&[
        "sweep",
        "--model",
        s(&m),
        "--dataset",
        "humaneval",
        "--num-samples",
        "1",
        "--max-new-tokens",
        "2",
        "--exit-layers",
        "2",
        "--speculations",
        "1",
        "--out",
        s(&file),
    ]);
    assert_error(code, &err, "creating --out");
    assert!(err.contains("a-file"), "{err}");
}

/// The kernels' environment variables are read by the binary in one place: a value that does
/// not parse is an error naming the variable, a valid one changes nothing in the output (every
/// CPU kernel computes the same chains).
#[test]
fn kernel_environment_variables_are_checked_and_exact() {
    let m = default_model();
    let run = |vars: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_layerskip"))
            .args([
                "infer",
                "--model",
                s(&m),
                "--prompt",
                "def f(x):",
                "--max-new-tokens",
                "8",
            ])
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = run(&[("LAYERSKIP_KERNEL", "sse9")]);
    assert_error(
        code,
        &err,
        "LAYERSKIP_KERNEL=\"sse9\": expected portable, avx2 or avx512",
    );
    let (code, _, err) = run(&[("LAYERSKIP_THREADS", "two")]);
    assert_error(
        code,
        &err,
        "LAYERSKIP_THREADS=\"two\": expected a whole number",
    );
    let (code, reference, err) = run(&[]);
    assert_eq!(code, 0, "{err}");
    let (code, portable, err) =
        run(&[("LAYERSKIP_KERNEL", "portable"), ("LAYERSKIP_THREADS", "1")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(portable, reference);
}
