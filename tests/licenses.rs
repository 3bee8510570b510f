//! The repository carries the text of every license it declares, and each shipped dataset and
//! model carries its own.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_declared_license_has_its_text_in_the_repository() {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap()).unwrap();
    let declared = manifest["workspace"]["package"]["license"]
        .as_str()
        .unwrap();
    let ids: Vec<&str> = declared.split(" OR ").collect();
    assert_eq!(ids, ["MIT", "Apache-2.0"], "{declared}");
    let mit = std::fs::read_to_string(root().join("LICENSE-MIT")).unwrap();
    assert!(mit.contains("Permission is hereby granted, free of charge"));
    let apache = std::fs::read_to_string(root().join("LICENSE-APACHE")).unwrap();
    assert!(apache.contains("Apache License") && apache.contains("Version 2.0, January 2004"));
}

#[test]
fn shipped_data_and_models_keep_their_licenses_beside_them() {
    let humaneval = std::fs::read_to_string(root().join("datasets/humaneval/LICENSE")).unwrap();
    assert!(humaneval.contains("MIT License") && humaneval.contains("OpenAI"));
    let model = std::fs::read_to_string(root().join("models/default/LICENSE.md")).unwrap();
    assert!(model.contains("PSF License") && model.contains("LICENSE-PYTHON.txt"));
    let psf = std::fs::read_to_string(root().join("models/default/LICENSE-PYTHON.txt")).unwrap();
    assert!(psf.contains("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2"));
}
