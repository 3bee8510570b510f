//! Training end to end on real text (this repository's own Rust sources) with a BPE tokenizer
//! trained here: the loss goes down at every exit, layer dropout at p = 0 is the identity bit for
//! bit, dropout draws match their rates, and a resumed run equals an uninterrupted one bit for bit.

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use layerskip_model::{LlamaConfig, LlamaModel, RopeConfig};
use layerskip_train::data::{read_documents, split};
use layerskip_train::schedule::{Curriculum, LayerDropoutConfig, LossScale, Shape};
use layerskip_train::tokenizer::{END_OF_TEXT, train_bpe};
use layerskip_train::trainer::draw_skip_mask;
use layerskip_train::{Blocks, TrainConfig, Trainer};
use rand::SeedableRng;

type B = Autodiff<Flex>;

fn corpus() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    [
        "layerskip-model/src",
        "layerskip-infer/src",
        "layerskip-train/src",
    ]
    .iter()
    .map(|d| root.join(d))
    .collect()
}

struct Data {
    train: Blocks,
    eval: Blocks,
    vocab: usize,
}

fn data(seq_len: usize) -> Data {
    let exts = vec!["rs".to_string()];
    let docs = read_documents(&corpus(), &exts).unwrap();
    let tokenizer = train_bpe(&docs, 384).unwrap();
    let eos = tokenizer.token_id(END_OF_TEXT).unwrap();
    let (train, eval) = split(docs, 0.2, 0).unwrap();
    Data {
        train: Blocks::pack(&train, &tokenizer, eos, seq_len).unwrap(),
        eval: Blocks::pack(&eval, &tokenizer, eos, seq_len).unwrap(),
        vocab: tokenizer.vocab_size(),
    }
}

fn model(vocab: usize, layers: usize) -> LlamaModel<B> {
    let config = LlamaConfig {
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: layers,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        max_position_embeddings: 128,
        rms_norm_eps: 1e-5,
        rope: RopeConfig {
            theta: 10_000.0,
            llama3_scaling: None,
        },
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![0],
    };
    let device = Default::default();
    B::seed(&device, 11);
    LlamaModel::init(&config, &device).unwrap()
}

fn config(steps: usize, p_max: f64) -> TrainConfig {
    let text = format!(
        r#"
steps = {steps}
seed = 3
[data]
seq_len = 32
[optim]
lr = 3e-3
warmup_steps = 2
batch_size = 4
grad_accum = 2
[layer_dropout]
p_max = {p_max}
time_shape = "exp"
[early_exit]
e_scale = 0.5
scale = "paper"
curriculum = {{ type = "rotational", period = 2 }}
"#
    );
    let c: TrainConfig = toml::from_str(&text).unwrap();
    c.validate_basic().unwrap();
    c
}

/// The tensor values of a model's safetensors file (header skipped), f32.
fn weight_values(m: &LlamaModel<B>) -> Vec<f32> {
    let dir = std::env::temp_dir().join(format!(
        "ls-wv-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    m.save_pretrained(&dir, layerskip_model::SaveDtype::F32)
        .unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn loss_goes_down_at_every_exit() {
    let d = data(32);
    assert!(
        d.train.len() > 50 && !d.eval.is_empty(),
        "{} / {} blocks",
        d.train.len(),
        d.eval.len()
    );
    let mut trainer = Trainer::new(
        config(40, 0.2),
        model(d.vocab, 4),
        d.train,
        d.eval,
        Default::default(),
    )
    .unwrap();
    let before = trainer.evaluate().unwrap();
    while !trainer.finished() {
        let r = trainer.train_step().unwrap();
        assert!(r.loss.is_finite());
        assert!((r.per_layer.iter().map(|(_, w, _)| w).sum::<f64>() - 1.0).abs() < 1e-9);
    }
    let after = trainer.evaluate().unwrap();
    for (l, (a, b)) in after.loss.iter().zip(&before.loss).enumerate() {
        assert!(a < b, "exit {l}: held-out loss {b} -> {a}");
    }
    eprintln!(
        "held-out loss per exit: {:?} -> {:?}",
        before.loss, after.loss
    );
}

#[test]
fn dropout_at_p_zero_equals_no_dropout_bit_for_bit() {
    let d = data(32);
    let run = |c: TrainConfig| {
        let mut t = Trainer::new(
            c,
            model(d.vocab, 3),
            d.train.clone(),
            d.eval.clone(),
            Default::default(),
        )
        .unwrap();
        for _ in 0..3 {
            t.train_step().unwrap();
        }
        weight_values(t.model())
    };
    let mut none = config(3, 0.0);
    none.layer_dropout = None;
    assert_eq!(run(config(3, 0.0)), run(none));
}

#[test]
fn skip_draws_match_rates() {
    let c = LayerDropoutConfig {
        p_max: 0.3,
        layer_shape: Shape::Linear,
        time_shape: Shape::Uniform,
        layers: ":".into(),
    };
    let rates = c.rates(0, 10, 4).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let n = 20_000;
    let mask = draw_skip_mask(&rates, n, &mut rng);
    for (l, row) in mask.skip.iter().enumerate() {
        let frac = row.iter().filter(|&&s| s).count() as f64 / n as f64;
        // 4 standard errors of a Bernoulli(p) mean over n draws.
        let tol = 4.0 * (rates[l] * (1.0 - rates[l]) / n as f64).sqrt() + 1e-12;
        assert!(
            (frac - rates[l]).abs() <= tol,
            "layer {l}: {frac} vs {}",
            rates[l]
        );
    }
    assert!(mask.skip[0].iter().all(|&s| !s), "rate 0 never skips");
}

#[test]
fn resume_is_bit_exact() {
    let d = data(32);
    let out = std::env::temp_dir().join(format!("ls-resume-{}", std::process::id()));
    std::fs::remove_dir_all(&out).ok();
    let trained = |steps: usize| {
        let mut t = Trainer::new(
            config(6, 0.3),
            model(d.vocab, 3),
            d.train.clone(),
            d.eval.clone(),
            Default::default(),
        )
        .unwrap();
        for _ in 0..steps {
            t.train_step().unwrap();
        }
        t
    };
    let straight = trained(6);
    let first = trained(3);
    let dir = first
        .save_checkpoint(&out, &[("note.txt", b"extra")])
        .unwrap();
    assert_eq!(std::fs::read(dir.join("note.txt")).unwrap(), b"extra");
    drop(first);
    assert_eq!(layerskip_train::latest_checkpoint(&out).unwrap(), dir);
    let mut resumed = Trainer::<B>::resume(&dir, d.train, d.eval, Default::default()).unwrap();
    assert_eq!(resumed.step_count(), 3);
    while !resumed.finished() {
        resumed.train_step().unwrap();
    }
    assert_eq!(
        weight_values(resumed.model()),
        weight_values(straight.model())
    );
    std::fs::remove_dir_all(&out).ok();
}

/// A save never rewrites a checkpoint that is there (a resume that ends where it started), and
/// whatever a kill leaves at each point of a save resumes: a partial `.tmp` (removed on open,
/// `latest` still names the previous checkpoint) and a renamed checkpoint that `latest` does
/// not name yet (kept when the resumed run reaches its step again).
#[cfg(unix)]
#[test]
fn saves_never_rewrite_a_checkpoint_and_every_kill_point_resumes() {
    use layerskip_train::{RunDir, Start, latest_checkpoint};
    use std::os::unix::fs::MetadataExt;
    let d = data(32);
    let out = std::env::temp_dir().join(format!("ls-resave-{}", std::process::id()));
    std::fs::remove_dir_all(&out).ok();
    std::fs::create_dir_all(&out).unwrap();
    let inode = |dir: &std::path::Path| {
        std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .ino()
    };
    let mut t = Trainer::new(
        config(6, 0.3),
        model(d.vocab, 3),
        d.train.clone(),
        d.eval.clone(),
        Default::default(),
    )
    .unwrap();
    for _ in 0..3 {
        t.train_step().unwrap();
    }
    let third = t.save_checkpoint(&out, &[]).unwrap();
    let ino = inode(&third);
    assert_eq!(t.save_checkpoint(&out, &[]).unwrap(), third);
    assert_eq!(
        inode(&third),
        ino,
        "the same step's checkpoint is kept, not rewritten"
    );
    drop(t);

    // Killed while writing step 6's temporary directory.
    std::fs::create_dir_all(out.join(".checkpoint-000006.tmp")).unwrap();
    std::fs::write(
        out.join(".checkpoint-000006.tmp/model.safetensors"),
        b"partial",
    )
    .unwrap();
    drop(RunDir::open(&out, Start::Resume).unwrap());
    assert!(!out.join(".checkpoint-000006.tmp").exists());
    assert_eq!(latest_checkpoint(&out).unwrap(), third);

    // A resumed run saved at once (nothing to train) keeps the checkpoint it resumed from.
    let mut resumed =
        Trainer::<B>::resume(&third, d.train.clone(), d.eval.clone(), Default::default()).unwrap();
    assert_eq!(resumed.save_checkpoint(&out, &[]).unwrap(), third);
    assert_eq!(inode(&third), ino);
    while !resumed.finished() {
        resumed.train_step().unwrap();
    }
    let sixth = resumed.save_checkpoint(&out, &[]).unwrap();
    let ino6 = inode(&sixth);

    // Killed after step 6's rename, before `latest` named it: the run resumes from step 3 and
    // keeps step 6's checkpoint when it gets there.
    std::fs::write(out.join("latest"), "checkpoint-000003").unwrap();
    let mut again = Trainer::<B>::resume(
        &latest_checkpoint(&out).unwrap(),
        d.train.clone(),
        d.eval.clone(),
        Default::default(),
    )
    .unwrap();
    while !again.finished() {
        again.train_step().unwrap();
    }
    assert_eq!(again.save_checkpoint(&out, &[]).unwrap(), sixth);
    assert_eq!(inode(&sixth), ino6);
    assert_eq!(latest_checkpoint(&out).unwrap(), sixth);

    // A directory of a checkpoint's name that is not one is refused, not replaced.
    std::fs::remove_dir_all(&sixth).unwrap();
    std::fs::create_dir_all(&sixth).unwrap();
    std::fs::write(sixth.join("mine.txt"), b"user file").unwrap();
    let err = again.save_checkpoint(&out, &[]).unwrap_err().to_string();
    assert!(err.contains("not this run's checkpoint"), "{err}");
    assert_eq!(std::fs::read(sixth.join("mine.txt")).unwrap(), b"user file");
    std::fs::remove_dir_all(&out).ok();
}

/// A step whose loss is not finite stops the run with an error naming the step, before the
/// optimizer applies it (the weights stay those of the last good step).
#[test]
fn a_non_finite_loss_stops_the_run_before_its_update() {
    use burn::module::{Module, ModuleMapper, Param};
    use layerskip_train::TrainError;
    /// Every RMSNorm gain (the model's only 1-D weights) set to NaN.
    struct NanGains;
    impl ModuleMapper<B> for NanGains {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<burn::tensor::Tensor<B, D>>,
        ) -> Param<burn::tensor::Tensor<B, D>> {
            if D == 1 {
                param.map(|t| t.mul_scalar(f32::NAN))
            } else {
                param
            }
        }
    }
    let d = data(32);
    let m = model(d.vocab, 3).map(&mut NanGains);
    let mut t = Trainer::new(config(6, 0.3), m, d.train, d.eval, Default::default()).unwrap();
    let bits = |m: &LlamaModel<B>| {
        weight_values(m)
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    let before = bits(t.model());
    let err = t.train_step().unwrap_err();
    assert!(
        matches!(err, TrainError::NonFinite { step: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("step 1"), "{err}");
    assert_eq!(t.step_count(), 0);
    assert_eq!(bits(t.model()), before, "the step was not applied");
}

#[test]
fn presets_in_configs_parse_and_validate() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let c =
                TrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Layer ranges against the preset's own model (12 layers for fine-tuning presets).
            let layers = c.model.as_ref().map_or(12, |m| m.num_layers);
            c.validate_for(layers)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(
        n >= 6,
        "expected the paper's presets and ablations, found {n}"
    );
    let _ = (Curriculum::None, LossScale::Paper);
}

/// Data parallelism through Burn's multi-device optimizer step, on replicas of the one Flex
/// device: 2 and 4 shards per micro-batch (with layer dropout and gradient accumulation) give the
/// single-device losses and weights up to float summation order (1e-5 relative on losses, 1e-4
/// of the largest weight after 4 AdamW steps).
#[test]
fn data_parallel_shards_equal_single_device_training() {
    let d = data(32);
    let init = model(d.vocab, 3);
    let run = |devices: usize| {
        let mut t = Trainer::new(
            config(4, 0.5),
            init.clone(),
            d.train.clone(),
            d.eval.clone(),
            Default::default(),
        )
        .unwrap()
        .with_data_parallel(vec![Default::default(); devices])
        .unwrap();
        assert_eq!(t.data_parallel_devices(), devices);
        let reports: Vec<_> = (0..4).map(|_| t.train_step().unwrap()).collect();
        (weight_values(t.model()), reports)
    };
    let (w1, r1) = run(1);
    let scale = w1.iter().fold(0f32, |m, v| m.max(v.abs()));
    for devices in [2, 4] {
        let (w, r) = run(devices);
        for (a, b) in r1.iter().zip(&r) {
            assert!(
                (a.loss - b.loss).abs() <= 1e-5 * a.loss,
                "{devices} devices, step {}: loss {} vs {}",
                a.step,
                b.loss,
                a.loss
            );
            assert_eq!(a.skipped_fraction, b.skipped_fraction);
            assert!(
                a.skipped_fraction > 0.0 || a.step < 2,
                "dropout draws are shared"
            );
            for (x, y) in a.per_layer.iter().zip(&b.per_layer) {
                assert_eq!((x.0, x.1), (y.0, y.1));
                assert!((x.2 - y.2).abs() <= 1e-5 * x.2, "{x:?} vs {y:?}");
            }
        }
        let worst = w1
            .iter()
            .zip(&w)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-4 * scale,
            "{devices} devices: weights differ by {worst}"
        );
        assert!(w1 != weight_values(&init), "training moved the weights");
    }
    let err = Trainer::new(
        config(4, 0.5),
        init,
        d.train.clone(),
        d.eval.clone(),
        Default::default(),
    )
    .unwrap()
    .with_data_parallel(vec![Default::default(); 3])
    .err()
    .unwrap();
    assert!(err.to_string().contains("not divisible"), "{err}");
}

/// bf16 mixed precision: the products take bf16 operands (AVX512-BF16's products, or the f32
/// GEMM on rounded operands on other CPUs), so the losses differ from f32 by bf16 rounding
/// averaged over the tokens (measured 1e-5 relative, bound 1e-3), the master weights stay f32, and
/// the updates point the way f32 training's do (cosine similarity of the weight changes over 3
/// steps: measured 0.9999, bound 0.9).
#[test]
fn bf16_mixed_precision_tracks_f32_training_with_f32_master_weights() {
    use layerskip_train::config::MixedPrecision;
    let d = data(32);
    let init = model(d.vocab, 3);
    let w0 = weight_values(&init);
    let run = |precision: MixedPrecision| {
        let mut c = config(3, 0.0);
        c.optim.mixed_precision = precision;
        let mut t = Trainer::new(
            c,
            init.clone(),
            d.train.clone(),
            d.eval.clone(),
            Default::default(),
        )
        .unwrap();
        let reports: Vec<_> = (0..3).map(|_| t.train_step().unwrap()).collect();
        assert_eq!(
            t.model().embed_tokens().val().dtype(),
            burn::tensor::DType::F32
        );
        let delta: Vec<f32> = weight_values(t.model())
            .iter()
            .zip(&w0)
            .map(|(a, b)| a - b)
            .collect();
        (reports, delta)
    };
    let (r32, d32) = run(MixedPrecision::Off);
    let (rbf, dbf) = run(MixedPrecision::Bf16);
    for (a, b) in r32.iter().zip(&rbf) {
        assert!(
            (a.loss - b.loss).abs() <= 1e-3 * a.loss,
            "step {}: bf16 loss {} vs f32 {}",
            a.step,
            b.loss,
            a.loss
        );
    }
    assert_ne!(r32[0].loss, rbf[0].loss, "the products really are bf16");
    let dot: f64 = d32.iter().zip(&dbf).map(|(a, b)| (a * b) as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
    let cosine = dot / (norm(&d32) * norm(&dbf));
    eprintln!(
        "bf16 mixed precision: losses {:?} vs f32 {:?}, update cosine {cosine:.4}",
        rbf.iter().map(|r| r.loss).collect::<Vec<_>>(),
        r32.iter().map(|r| r.loss).collect::<Vec<_>>()
    );
    assert!(cosine > 0.9, "cosine of the weight updates {cosine}");
}
