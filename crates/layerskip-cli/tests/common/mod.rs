//! What the binary's test files share.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The model shipped in `models/default`.
pub fn shipped_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default")
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
