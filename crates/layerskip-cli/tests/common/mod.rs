//! What the binary's test files share.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The model shipped in `models/default`.
pub fn shipped_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default")
}

/// A number from the shipped model's `config.json` (`num_hidden_layers`, `vocab_size`,
/// `max_position_embeddings`): tests derive what they expect of it from its config.
#[allow(dead_code)] // not every test file reads the config
pub fn shipped_config(key: &str) -> usize {
    let text = std::fs::read_to_string(shipped_model().join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in config.json")) as usize
}

/// A fresh directory under the system's temporary directory, removed with everything in it
/// when dropped (a test's model copies and runs are tens of megabytes; left behind, repeated
/// test runs filled the disk). Derefs to its path.
pub struct Scratch(PathBuf);

#[allow(dead_code)] // not every test file makes scratch directories
impl Scratch {
    /// `TMP/layerskip-{prefix}-{pid}-{name}`, emptied if an earlier process of the same id left
    /// it.
    pub fn new(prefix: &str, name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("layerskip-{prefix}-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = PathBuf;

    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the shipped model's files into `dir` (created), for a test to change.
pub fn copy_shipped_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(shipped_model().join(file), dir.join(file)).unwrap();
    }
}

/// Runs the `layerskip` binary: exit code, stdout, stderr.
pub fn layerskip(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_layerskip"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
