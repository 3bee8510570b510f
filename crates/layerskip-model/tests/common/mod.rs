//! Parity helpers shared by the model test binaries: the transformers reference fixtures
//! written by `scripts/make_reference.py` and a per-layer comparison on any backend.
#![allow(dead_code)] // each test binary uses a subset

use layerskip_model::LayerSkipBackend;
use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use layerskip_model::{KvCache, LlamaModel};
use safetensors::SafeTensors;

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny")
        .join(name)
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load(name: &str) -> Self {
        let bytes =
            std::fs::read(fixture_dir(name).join("reference.safetensors")).expect("fixture");
        Self { bytes }
    }

    fn tensor(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("reference tensor {name}"));
        (view.shape().to_vec(), view.data().to_vec())
    }

    fn has(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.bytes)
            .unwrap()
            .names()
            .contains(&name)
    }

    fn ids(&self, i: usize) -> Vec<i64> {
        let (_, bytes) = self.tensor(&format!("input_{i}"));
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn floats(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, bytes) = self.tensor(name);
        (
            shape,
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }
}

fn assert_close<B: LayerSkipBackend>(
    ours: Tensor<B, 3>,
    reference: (Vec<usize>, Vec<f32>),
    rel_tol: f32,
    what: &str,
) {
    let (shape, expected) = reference;
    let dims = ours.dims();
    assert_eq!(&dims[1..], shape.as_slice(), "{what}: shape");
    let got = ours.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&expected)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= rel_tol * scale,
        "{what}: max abs diff {worst} exceeds {rel_tol} * {scale}"
    );
}

fn tokens<B: LayerSkipBackend>(ids: &[i64], device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

/// Loads fixture `name` on `device` and compares every decoder layer's output, the logits, and
/// the logits through the KV cache one token at a time with the transformers reference:
/// max |ours - reference| <= `rel_tol` * max |reference| per tensor.
pub fn check_variant<B: LayerSkipBackend>(name: &str, device: &B::Device, rel_tol: f32) {
    let model = LlamaModel::<B>::from_pretrained(&fixture_dir(name), device).expect("load");
    let reference = Reference::load(name);
    let mut i = 0;
    while reference.has(&format!("input_{i}")) {
        let ids = reference.ids(i);
        // Layer by layer: the residual stream after each layer matches HF's decoder-layer output.
        let mut x = model.embed(tokens(&ids, device));
        for l in 0..model.num_layers() {
            x = model.forward_layers(x, l..l + 1, 0, None).unwrap();
            assert_close(
                x.clone(),
                reference.floats(&format!("hidden_{i}_{l}")),
                rel_tol,
                &format!("{name} input {i} layer {l}"),
            );
        }
        let logits = model.forward(tokens(&ids, device), 0, None).unwrap();
        assert_close(
            logits,
            reference.floats(&format!("logits_{i}")),
            rel_tol,
            &format!("{name} input {i} logits"),
        );
        // And through the KV cache, one token at a time.
        let mut cache = KvCache::new(model.config(), 1, 32, device);
        for (pos, id) in ids.iter().enumerate() {
            let step = model
                .forward(tokens(&[*id], device), pos, Some(&mut cache))
                .unwrap();
            let (shape, all) = reference.floats(&format!("logits_{i}"));
            let vocab = shape[1];
            let row = all[pos * vocab..(pos + 1) * vocab].to_vec();
            assert_close(
                step,
                (vec![1, vocab], row),
                rel_tol,
                &format!("{name} input {i} cached position {pos}"),
            );
        }
        i += 1;
    }
    assert!(i >= 3, "{name}: expected at least 3 reference inputs");
}
