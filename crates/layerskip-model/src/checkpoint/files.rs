//! The files beside a checkpoint's weights and how they are written: the tokenizer files, the
//! dtype tensors are saved in, atomic writes (a temporary file, synced, renamed), and the
//! recommended decoding strategy (`layerskip.json`).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::{ModelError, Result};

/// The tokenizer files a Hugging Face checkpoint may carry beside its weights: the vocabulary,
/// the tokenizer config with the chat template, special tokens, and generation defaults. Tools
/// that write a checkpoint derived from another (re-saving, training) copy every one present.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

/// The [`TOKENIZER_FILES`] present in `dir`, with their bytes.
pub fn read_tokenizer_files(dir: &Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let mut files = Vec::new();
    for name in TOKENIZER_FILES {
        let path = dir.join(name);
        if path.is_file() {
            files.push((
                name,
                std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?,
            ));
        }
    }
    Ok(files)
}

/// The dtype a checkpoint is saved in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl SaveDtype {
    fn safetensors(self) -> Dtype {
        match self {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::F16 => Dtype::F16,
            SaveDtype::Bf16 => Dtype::BF16,
        }
    }

    pub(crate) fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::F16 => "float16",
            SaveDtype::Bf16 => "bfloat16",
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            SaveDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            SaveDtype::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            SaveDtype::Bf16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
}

/// One tensor ready to be written: its name, row-major shape and encoded bytes.
pub struct TensorBytes {
    name: String,
    shape: Vec<usize>,
    dtype: SaveDtype,
    bytes: Vec<u8>,
}

impl TensorBytes {
    /// Encodes f32 `values` of `shape` in `dtype`.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        values: &[f32],
        dtype: SaveDtype,
    ) -> Self {
        Self {
            name: name.into(),
            shape,
            dtype,
            bytes: dtype.encode(values),
        }
    }
}

/// Streams `tensors` into a safetensors file at `path` (temporary name, then rename).
pub fn write_safetensors_atomic(path: &Path, tensors: Vec<TensorBytes>) -> Result<()> {
    let views = tensors
        .iter()
        .map(|t| {
            let view = safetensors::tensor::TensorView::new(
                t.dtype.safetensors(),
                t.shape.clone(),
                &t.bytes,
            )
            .expect("tensor bytes match their shape");
            (t.name.clone(), view)
        })
        .collect::<Vec<_>>();
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let tmp = tmp_path(path);
    safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| ModelError::parse(&tmp, e.to_string()))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| ModelError::io(&tmp, e))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// The file in a checkpoint directory that records the self-speculation settings measured best
/// for the model (written by `layerskip sweep --record`); `infer` and `serve` use them when no
/// strategy is named.
pub const RECOMMENDATION_FILE: &str = "layerskip.json";

/// A model's recommended self-speculation settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Recommendation {
    /// Exit layer E of the drafts.
    pub exit_layer: usize,
    /// Drafts per step d.
    pub speculations: usize,
    /// The speedup over autoregressive decoding measured for it, if recorded.
    #[serde(default)]
    pub speedup: Option<f64>,
    /// How it was measured (command, machine, date).
    #[serde(default)]
    pub measured: Option<String>,
}

impl Recommendation {
    /// The recommendation recorded in `dir`, if there is one; a malformed file is an error.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(RECOMMENDATION_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ModelError::io(&path, e)),
        };
        let r: Self =
            serde_json::from_str(&text).map_err(|e| ModelError::parse(&path, e.to_string()))?;
        if r.exit_layer == 0 || r.speculations == 0 {
            return Err(ModelError::parse(
                &path,
                "exit_layer and speculations must be at least 1",
            ));
        }
        Ok(Some(r))
    }

    /// Records it in `dir` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("serialisable recommendation");
        write_atomic(&dir.join(RECOMMENDATION_FILE), text.as_bytes())
    }
}
