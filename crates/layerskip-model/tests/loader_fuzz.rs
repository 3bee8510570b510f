//! Fuzz-style robustness of the loaders: truncated and mutated safetensors files, config.json and
//! GGUF files (seeded, a few hundred cases each) must give an error that names the file, never a
//! panic, an overflow, or an allocation the file cannot back.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use layerskip_model::{LlamaModel, SaveDtype, convert_gguf};

type B = Flex;

/// xorshift64*: deterministic mutations without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Random mutations per file type: `default`, or `LAYERSKIP_FUZZ_CASES` for a longer search.
fn random_cases(default: usize) -> usize {
    std::env::var("LAYERSKIP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("layerskip-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/gqa_untied")
}

/// Byte strings derived from `original`: truncations at every interesting length, then random
/// overwrites of 1-4 bytes (mostly inside the first `header` bytes, where the structure is),
/// then 8-byte little-endian lengths set to huge values at random header positions.
fn mutations(original: &[u8], header: usize, seed: u64, random: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let header = header.min(original.len());
    let mut cuts = vec![
        0,
        1,
        4,
        7,
        8,
        9,
        16,
        header / 2,
        header.saturating_sub(1),
        header,
    ];
    cuts.extend([
        header + 1,
        original.len() / 2,
        original.len().saturating_sub(1),
    ]);
    for cut in cuts {
        if cut < original.len() {
            out.push(original[..cut].to_vec());
        }
    }
    let mut rng = Rng(seed);
    for i in 0..random {
        let mut bytes = original.to_vec();
        let span = if i % 4 == 0 { bytes.len() } else { header };
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(span);
            bytes[at] = rng.next() as u8;
        }
        out.push(bytes);
    }
    for _ in 0..random / 4 {
        let mut bytes = original.to_vec();
        let at = rng.below(header.saturating_sub(8));
        let huge = [u64::MAX, u64::MAX / 2, 1 << 40, (1 << 32) + 1][rng.below(4)];
        bytes[at..at + 8].copy_from_slice(&huge.to_le_bytes());
        out.push(bytes);
    }
    out
}

/// Runs `load`, which must not panic; an error must name `file`. Returns whether it failed.
fn check(case: &str, file: &str, load: impl FnOnce() -> Result<(), String>) -> bool {
    match catch_unwind(AssertUnwindSafe(load)) {
        Err(_) => panic!("{case}: the loader panicked"),
        Ok(Err(message)) => {
            assert!(
                message.contains(file),
                "{case}: {message:?} does not name {file}"
            );
            true
        }
        Ok(Ok(())) => false,
    }
}

fn load_dir(dir: &Path) -> Result<(), String> {
    LlamaModel::<B>::from_pretrained(dir, &Default::default())
        .map(drop)
        .map_err(|e| e.to_string())
}

#[test]
fn mutated_safetensors_files_are_errors_naming_the_file() {
    let dir = scratch("safetensors");
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    let original = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let cases = mutations(&original, header, 1, random_cases(400));
    let mut failed = 0;
    for (i, bytes) in cases.iter().enumerate() {
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        failed += check(
            &format!("safetensors case {i}"),
            "model.safetensors",
            || load_dir(&dir),
        ) as usize;
    }
    // Mutations of tensor data alone load (they are valid files); the rest must be errors.
    assert!(
        failed > cases.len() / 2,
        "{failed} of {} failed",
        cases.len()
    );
}

#[test]
fn mutated_configs_are_errors_naming_a_file() {
    let dir = scratch("config");
    std::fs::copy(
        fixture().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let original = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    let mut cases: Vec<Vec<u8>> =
        mutations(original.as_bytes(), original.len(), 2, random_cases(300));
    // Every numeric field set to values a hand-edited config might hold.
    let json: serde_json::Value = serde_json::from_str(&original).unwrap();
    for (key, value) in json.as_object().unwrap() {
        if !value.is_number() {
            continue;
        }
        for bad in [
            serde_json::json!(0),
            serde_json::json!(-1),
            serde_json::json!(1e30),
            serde_json::json!(u64::MAX),
            serde_json::json!("8"),
            serde_json::Value::Null,
        ] {
            let mut edited = json.clone();
            edited[key] = bad;
            cases.push(edited.to_string().into_bytes());
        }
    }
    let mut failed = 0;
    for (i, bytes) in cases.iter().enumerate() {
        std::fs::write(dir.join("config.json"), bytes).unwrap();
        // A config the weights do not fit fails on the weights' file; that names a file too.
        let result = catch_unwind(AssertUnwindSafe(|| load_dir(&dir)));
        match result {
            Err(_) => panic!(
                "config case {i}: the loader panicked on {}",
                String::from_utf8_lossy(bytes)
            ),
            Ok(Err(m)) => {
                assert!(
                    m.contains("config.json") || m.contains("model.safetensors"),
                    "config case {i}: {m:?} names no file"
                );
                failed += 1;
            }
            Ok(Ok(())) => {}
        }
    }
    assert!(
        failed > cases.len() / 2,
        "{failed} of {} failed",
        cases.len()
    );
}

/// A tiny llama GGUF (version 3, F32 tensors) written by hand: the metadata llama.cpp writes
/// and the tensors of a 2-layer model with hidden size 8.
fn tiny_gguf() -> (Vec<u8>, usize) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let (vocab, hidden, ffn, layers, heads, kv) = (16u64, 8u64, 16u64, 2u64, 2u64, 1u64);
    let head_dim = hidden / heads;
    let mut tensors: Vec<(String, Vec<u64>)> = vec![
        ("token_embd.weight".into(), vec![hidden, vocab]),
        ("output_norm.weight".into(), vec![hidden]),
    ];
    for l in 0..layers {
        for (name, dims) in [
            ("attn_q", vec![hidden, heads * head_dim]),
            ("attn_k", vec![hidden, kv * head_dim]),
            ("attn_v", vec![hidden, kv * head_dim]),
            ("attn_output", vec![heads * head_dim, hidden]),
            ("ffn_gate", vec![hidden, ffn]),
            ("ffn_up", vec![hidden, ffn]),
            ("ffn_down", vec![ffn, hidden]),
            ("attn_norm", vec![hidden]),
            ("ffn_norm", vec![hidden]),
        ] {
            tensors.push((format!("blk.{l}.{name}.weight"), dims));
        }
    }
    let ints = [
        ("llama.block_count", layers),
        ("llama.embedding_length", hidden),
        ("llama.feed_forward_length", ffn),
        ("llama.attention.head_count", heads),
        ("llama.attention.head_count_kv", kv),
        ("llama.context_length", 64),
        ("llama.vocab_size", vocab),
    ];
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((ints.len() as u64 + 2).to_le_bytes());
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    string(&mut out, "llama");
    string(&mut out, "general.alignment");
    out.extend(4u32.to_le_bytes());
    out.extend(32u32.to_le_bytes());
    for (key, value) in ints {
        string(&mut out, key);
        out.extend(4u32.to_le_bytes());
        out.extend((value as u32).to_le_bytes());
    }
    let mut offset = 0u64;
    let mut data = Vec::new();
    for (name, dims) in &tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(0u32.to_le_bytes()); // F32
        out.extend(offset.to_le_bytes());
        let n: u64 = dims.iter().product();
        for i in 0..n {
            data.extend(((i % 7) as f32 * 0.1).to_le_bytes());
        }
        offset += n * 4;
        while !data.len().is_multiple_of(32) {
            data.push(0);
            offset += 1;
        }
    }
    let header = out.len();
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(data);
    (out, header)
}

#[test]
fn mutated_gguf_files_are_errors_naming_the_file() {
    let dir = scratch("gguf");
    let (original, header) = tiny_gguf();
    let path = dir.join("tiny.gguf");
    let out = dir.join("out");
    std::fs::write(&path, &original).unwrap();
    let report = convert_gguf(&path, &out, SaveDtype::F32).expect("the unmutated file converts");
    assert_eq!(
        report.quantized, None,
        "an F32 file has no block format to keep"
    );
    load_dir(&out).expect("and loads");
    let cases = mutations(&original, header, 3, random_cases(600));
    let mut failed = 0;
    for (i, bytes) in cases.iter().enumerate() {
        std::fs::write(&path, bytes).unwrap();
        let _ = std::fs::remove_dir_all(&out);
        failed += check(&format!("gguf case {i}"), "tiny.gguf", || {
            convert_gguf(&path, &out, SaveDtype::F32)
                .map(drop)
                .map_err(|e| e.to_string())
        }) as usize;
    }
    assert!(
        failed > cases.len() / 2,
        "{failed} of {} failed",
        cases.len()
    );
}
