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

/// The default model's training data: every source in its manifest (`corpus.json`, written by
/// `scripts/corpus.py`) declares a permissive license and none a copyleft one, and its license
/// file and model card name the sources.
#[test]
fn the_default_models_corpus_is_permissively_licensed() {
    let dir = root().join("models/default");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("corpus.json")).unwrap()).unwrap();
    let taken = manifest["taken"].as_array().unwrap();
    assert!(!taken.is_empty());
    let permissive = ["MIT", "BSD", "Apache", "PSF", "ISC"];
    let copyleft = ["GPL", "MPL", "Mozilla", "EPL", "Eclipse", "GNU"];
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for source in taken {
        let name = source["name"].as_str().unwrap();
        let license = source["license"].as_str().unwrap();
        assert!(
            permissive.iter().any(|p| license.contains(p)),
            "{name}: {license}"
        );
        assert!(
            !copyleft.iter().any(|c| license.contains(c)),
            "{name}: {license}"
        );
        assert!(
            card.contains(&format!("| {name} |")),
            "{name} not in the card"
        );
    }
    let notice = std::fs::read_to_string(dir.join("LICENSE.md")).unwrap();
    assert!(
        notice.contains(&format!("{} sources", taken.len())),
        "{notice}"
    );
}
