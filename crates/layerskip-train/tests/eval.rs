//! `exit_quality` against a hand computation on the host: per-exit logits from
//! `forward_layers(0..E)` + the exit head (the inference path, not the training forward that
//! `exit_quality` uses), then log-softmax, argmax and agreement in plain Rust.

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use layerskip_model::LlamaModel;
use layerskip_train::Blocks;
use layerskip_train::eval::exit_quality;

fn logits_rows(model: &LlamaModel<Flex>, tokens: &[u32], exit: usize) -> Vec<Vec<f32>> {
    let device = Default::default();
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let x = model.embed(Tensor::<Flex, 2, Int>::from_data(
        TensorData::new(ids, [1, tokens.len()]),
        &device,
    ));
    let h = model.forward_layers(x, 0..exit, 0, None).unwrap();
    let vocab = model.config().vocab_size;
    model
        .exit_head(h)
        .into_data()
        .to_vec::<f32>()
        .unwrap()
        .chunks(vocab)
        .map(<[f32]>::to_vec)
        .collect()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

fn nll(row: &[f32], target: usize) -> f64 {
    let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    lse - row[target] as f64
}

#[test]
fn exit_quality_matches_a_host_computation() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/gqa_untied");
    let model = LlamaModel::<Flex>::from_pretrained(&dir, &Default::default()).unwrap();
    let (layers, vocab) = (model.num_layers(), model.config().vocab_size as u32);
    let seq = 12;
    let tokens: Vec<Vec<u32>> = (0..3u32)
        .map(|b| {
            (0..=seq as u32)
                .map(|i| (b * 37 + i * 11 + i * i) % vocab)
                .collect()
        })
        .collect();
    // The second block scores only its last 5 targets (a prompt/response mask).
    let mut mask = vec![vec![1.0; seq]; 3];
    mask[1][..seq - 5].fill(0.0);
    let blocks = Blocks {
        tokens: tokens.clone(),
        mask: mask.clone(),
        seq_len: seq,
    };
    // Batches of 2 split the blocks unevenly: pooled sums, not per-batch means, are compared.
    let report = exit_quality(&model, &blocks, 2, None).unwrap();
    assert_eq!((report.blocks, report.tokens), (3, 2 * seq + 5));
    let finals: Vec<Vec<Vec<f32>>> = tokens
        .iter()
        .map(|t| logits_rows(&model, &t[..seq], layers))
        .collect();
    for exit in 1..=layers {
        let (mut loss, mut correct, mut agree, mut w) = (0.0, 0.0, 0.0, 0.0);
        for (b, t) in tokens.iter().enumerate() {
            let rows = logits_rows(&model, &t[..seq], exit);
            for j in 0..seq {
                let m = mask[b][j] as f64;
                let target = t[j + 1] as usize;
                loss += m * nll(&rows[j], target);
                correct += m * f64::from(u8::from(argmax(&rows[j]) == target));
                agree += m * f64::from(u8::from(argmax(&rows[j]) == argmax(&finals[b][j])));
                w += m;
            }
        }
        let got = &report.exits[exit - 1];
        assert_eq!(got.exit_layer, exit);
        assert!(
            (got.loss - loss / w).abs() < 1e-4,
            "exit {exit}: {} vs {}",
            got.loss,
            loss / w
        );
        assert!((got.perplexity - (loss / w).exp()).abs() < 1e-3 * got.perplexity);
        assert!((got.accuracy - correct / w).abs() < 1e-9, "exit {exit}");
        assert!((got.agreement - agree / w).abs() < 1e-9, "exit {exit}");
    }
    assert_eq!(report.exits[layers - 1].agreement, 1.0);
    assert!(exit_quality(&model, &blocks, 0, None).is_err());
    let empty = Blocks {
        tokens: vec![],
        mask: vec![],
        seq_len: seq,
    };
    assert!(exit_quality(&model, &empty, 2, None).is_err());
}
