//! Invariants of the LayerSkip surface on a tiny random model (fixed seed, Flex CPU backend):
//! cached == full forward, layer ranges compose, truncation is exact, the skip mask is the
//! identity when empty and skips rows exactly when set, save/load round-trips.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use layerskip_model::{
    ExitHiddenCache, KV_FIRST_ALLOCATION, KvCache, LlamaConfig, LlamaModel, ModelError, RopeConfig,
    SaveDtype, SkipMask,
};

type B = Flex;

fn config(tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 5,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope: RopeConfig {
            theta: 10_000.0,
            llama3_scaling: None,
        },
        tie_word_embeddings: tied,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

fn model(tied: bool) -> LlamaModel<B> {
    let device = Default::default();
    B::seed(&device, 7);
    LlamaModel::init(&config(tied), &device).unwrap()
}

fn tokens(ids: &[i64], batch: usize) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = (0..batch)
        .flat_map(|b| ids.iter().map(move |t| (t + b as i64) % 50))
        .collect();
    Tensor::from_data(
        TensorData::new(data, [batch, ids.len()]),
        &Default::default(),
    )
}

fn max_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).abs().max().into_scalar()
}

const IDS: [i64; 9] = [1, 5, 9, 3, 44, 17, 2, 8, 30];

#[test]
fn cached_token_by_token_equals_full_forward() {
    let m = model(false);
    let full = m.forward(tokens(&IDS, 1), 0, None).unwrap();
    let mut cache = KvCache::new(m.config(), 1, 16, &Default::default());
    // A prefill of 4 then one token at a time.
    assert!(max_diff(decode_over_cache(&m, &mut cache, 4), full) < 1e-5);
    assert_eq!(cache.len(0), IDS.len());
}

/// Logits of `IDS` through `cache`: a prefill of `prefill` tokens, then one token at a time.
fn decode_over_cache(m: &LlamaModel<B>, cache: &mut KvCache<B>, prefill: usize) -> Tensor<B, 3> {
    let mut parts = vec![
        m.forward(tokens(&IDS[..prefill], 1), 0, Some(cache))
            .unwrap(),
    ];
    for pos in prefill..IDS.len() {
        parts.push(
            m.forward(tokens(&IDS[pos..pos + 1], 1), pos, Some(cache))
                .unwrap(),
        );
    }
    Tensor::cat(parts, 1)
}

/// A cache whose buffers grow while decoding (from `KV_FIRST_ALLOCATION` positions to twice
/// that, then to the capacity) gives the full forward's logits: the held positions move over
/// intact, and attention reads the grown buffers.
#[test]
fn cached_decoding_through_buffer_growth_equals_full_forward() {
    let device = Default::default();
    B::seed(&device, 5);
    let c = LlamaConfig {
        max_position_embeddings: 1024,
        ..config(false)
    };
    let m = LlamaModel::<B>::init(&c, &device).unwrap();
    let first = KV_FIRST_ALLOCATION;
    let n = 2 * first + 20;
    let ids: Vec<i64> = (0..n as i64).map(|i| (i * 7 + 3) % 50).collect();
    let full = m.forward(tokens(&ids, 1), 0, None).unwrap();
    let mut cache = KvCache::new(m.config(), 1, 2 * first + 100, &device);
    let per_position = cache.position_bytes();
    assert_eq!(cache.allocated_bytes(), first * per_position);
    // A prefill that fits, one token that overflows it, a prefill-sized chunk, then one at a time.
    let cuts = [0, first - 3, first + 1, 2 * first - 2];
    let mut parts = Vec::new();
    for w in cuts.windows(2) {
        let chunk = tokens(&ids[w[0]..w[1]], 1);
        parts.push(m.forward(chunk, w[0], Some(&mut cache)).unwrap());
    }
    assert_eq!(cache.allocated_bytes(), 2 * first * per_position);
    for pos in cuts[3]..n {
        let token = tokens(&ids[pos..pos + 1], 1);
        parts.push(m.forward(token, pos, Some(&mut cache)).unwrap());
    }
    assert_eq!(cache.allocated_bytes(), (2 * first + 100) * per_position);
    assert_eq!(cache.len(0), n);
    let diff = max_diff(Tensor::cat(parts, 1), full);
    assert!(diff < 1e-5, "{diff}");
}

/// The same over the cache for head dims that the AVX2 attention kernel does not take (12: not
/// whole vectors, the scalar kernel) and takes with another register count (48: six vectors).
#[test]
fn cached_decoding_equals_full_forward_for_other_head_dims() {
    for head_dim in [12, 48] {
        let device = Default::default();
        B::seed(&device, 9);
        let c = LlamaConfig {
            head_dim,
            ..config(false)
        };
        let m = LlamaModel::<B>::init(&c, &device).unwrap();
        let full = m.forward(tokens(&IDS, 1), 0, None).unwrap();
        let mut cache = KvCache::new(m.config(), 1, 16, &device);
        let diff = max_diff(decode_over_cache(&m, &mut cache, 3), full);
        assert!(diff < 1e-5, "head_dim {head_dim}: {diff}");
    }
}

#[test]
fn layer_ranges_compose_for_every_exit() {
    let m = model(true);
    let x0 = m.embed(tokens(&IDS, 2));
    let all = m.forward_layers(x0.clone(), 0..5, 0, None).unwrap();
    for e in 0..=5 {
        let early = m.forward_layers(x0.clone(), 0..e, 0, None).unwrap();
        let rest = m.forward_layers(early, e..5, 0, None).unwrap();
        assert!(max_diff(rest, all.clone()) < 1e-6, "split at {e}");
    }
}

#[test]
fn early_layers_can_run_ahead_of_deep_layers_in_one_cache() {
    // Self-speculation's access pattern: layers < E take positions one by one, then the deep
    // layers catch up over all of them in one pass from the exit hidden states.
    let m = model(false);
    let device = Default::default();
    let full = m.forward(tokens(&IDS, 1), 0, None).unwrap();
    let mut cache = KvCache::new(m.config(), 1, 16, &device);
    let mut exits = ExitHiddenCache::new(1, 16, 32, &device);
    for pos in 0..IDS.len() {
        let h = m
            .forward_layers(
                m.embed(tokens(&IDS[pos..pos + 1], 1)),
                0..2,
                pos,
                Some(&mut cache),
            )
            .unwrap();
        exits.append(h).unwrap();
    }
    assert_eq!((cache.len(1), cache.len(2)), (IDS.len(), 0));
    let deep = m
        .forward_layers(exits.since(0), 2..5, 0, Some(&mut cache))
        .unwrap();
    assert!(max_diff(m.exit_head(deep), full) < 1e-5);
}

#[test]
fn truncate_then_redecode_reproduces_logits() {
    let m = model(false);
    let mut cache = KvCache::new(m.config(), 1, 16, &Default::default());
    let first = m.forward(tokens(&IDS, 1), 0, Some(&mut cache)).unwrap();
    cache.truncate(5);
    assert_eq!(cache.len(4), 5);
    // Overwrite positions 5.. with other tokens, then roll back and decode the originals.
    m.forward(tokens(&[11, 12, 13], 1), 5, Some(&mut cache))
        .unwrap();
    cache.truncate(5);
    let again = m
        .forward(tokens(&IDS[5..], 1), 5, Some(&mut cache))
        .unwrap();
    assert!(max_diff(again, first.slice([0..1, 5..9, 0..50])) < 1e-5);
}

#[test]
fn cache_overflow_and_bad_ranges_are_errors() {
    let m = model(false);
    let mut cache = KvCache::new(m.config(), 1, 4, &Default::default());
    let err = m.forward(tokens(&IDS, 1), 0, Some(&mut cache)).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextOverflow {
                requested: 9,
                capacity: 4
            }
        ),
        "{err}"
    );
    let err = m
        .forward_layers(m.embed(tokens(&IDS, 1)), 2..6, 0, None)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::LayerRange {
                end: 6,
                num_layers: 5,
                ..
            }
        ),
        "{err}"
    );
    let long: Vec<i64> = (0..65).map(|i| i % 50).collect();
    let err = m.forward(tokens(&long, 1), 0, None).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextOverflow {
                requested: 65,
                capacity: 64
            }
        ),
        "{err}"
    );
}

#[test]
fn skip_mask_all_false_equals_plain_forward() {
    let m = model(false);
    let plain = m.forward(tokens(&IDS, 3), 0, None).unwrap();
    let mask = SkipMask {
        skip: vec![vec![false; 3]; 5],
    };
    let out = m
        .forward_train(tokens(&IDS, 3), &[1, 3], Some(&mask))
        .unwrap();
    assert_eq!(max_diff(out.logits.clone(), plain.clone()), 0.0);
    let none = m.forward_train(tokens(&IDS, 3), &[1, 3], None).unwrap();
    assert_eq!(max_diff(none.logits, plain), 0.0);
    // The exit hidden states are the residual stream after those layers.
    let x1 = m
        .forward_layers(m.embed(tokens(&IDS, 3)), 0..2, 0, None)
        .unwrap();
    assert_eq!(out.exit_hidden[0].0, 1);
    assert_eq!(max_diff(out.exit_hidden[0].1.clone(), x1), 0.0);
}

#[test]
fn skipped_sequences_pass_through_unchanged() {
    let m = model(false);
    // Sequence 1 skips layers 1 and 3; sequences 0 and 2 run every layer.
    let mut skip = vec![vec![false; 3]; 5];
    skip[1][1] = true;
    skip[3][1] = true;
    let out = m
        .forward_train(tokens(&IDS, 3), &[0, 1, 2, 3], Some(&SkipMask { skip }))
        .unwrap();
    let h: Vec<Tensor<B, 3>> = out.exit_hidden.iter().map(|(_, h)| h.clone()).collect();
    let row = |t: &Tensor<B, 3>, b: usize| t.clone().slice_dim(0, b..b + 1);
    // Skipped: x_2 == x_1 and x_4 == x_3 for sequence 1, bit for bit.
    assert_eq!(max_diff(row(&h[1], 1), row(&h[0], 1)), 0.0);
    assert_eq!(max_diff(row(&h[3], 1), row(&h[2], 1)), 0.0);
    // Not skipped: the other sequences equal the plain forward of their own.
    let plain = m.forward(tokens(&IDS, 3), 0, None).unwrap();
    for b in [0, 2] {
        assert!(max_diff(row(&out.logits, b), row(&plain, b)) < 1e-5);
    }
    // Sequence 1 equals running layers 0, 2, 4 only.
    let x = m.embed(tokens(&IDS, 3)).slice([1..2, 0..9, 0..32]);
    let mut x = m.forward_layers(x, 0..1, 0, None).unwrap();
    for l in [2, 4] {
        x = m.forward_layers(x, l..l + 1, 0, None).unwrap();
    }
    assert!(max_diff(m.exit_head(x), row(&out.logits, 1)) < 1e-5);
}

#[test]
fn skip_mask_of_wrong_shape_is_an_error() {
    let m = model(false);
    let mask = SkipMask {
        skip: vec![vec![false; 2]; 5],
    };
    assert!(m.forward_train(tokens(&IDS, 3), &[], Some(&mask)).is_err());
    assert!(m.forward_train(tokens(&IDS, 3), &[5], None).is_err());
}

#[test]
fn save_and_load_round_trip() {
    let dir = std::env::temp_dir().join(format!("layerskip-roundtrip-{}", std::process::id()));
    for tied in [false, true] {
        let m = model(tied);
        m.save_pretrained(&dir, SaveDtype::F32).unwrap();
        let loaded = LlamaModel::<B>::from_pretrained(&dir, &Default::default()).unwrap();
        assert_eq!(loaded.config(), m.config());
        let (a, b) = (
            m.forward(tokens(&IDS, 1), 0, None).unwrap(),
            loaded.forward(tokens(&IDS, 1), 0, None).unwrap(),
        );
        assert_eq!(max_diff(a.clone(), b), 0.0);
        // bf16 keeps 8 bits of mantissa: logits move, but only a little.
        m.save_pretrained(&dir, SaveDtype::Bf16).unwrap();
        let half = LlamaModel::<B>::from_pretrained(&dir, &Default::default()).unwrap();
        let d = max_diff(half.forward(tokens(&IDS, 1), 0, None).unwrap(), a);
        assert!(d > 0.0 && d < 0.05, "bf16 round trip moved logits by {d}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_bf16_cast_computes_in_bf16_close_to_f32_and_keeps_parameter_ids() {
    use burn::module::Module;
    use burn::tensor::{DType, FloatDType};
    for tied in [true, false] {
        let m = model(tied);
        let half = m.cast(FloatDType::BF16);
        assert_eq!(half.embed_tokens().val().dtype(), DType::BF16);
        assert_eq!(half.embed_tokens().id, m.embed_tokens().id);
        assert_eq!(half.num_params(), m.num_params());
        let full = m.forward(tokens(&IDS, 2), 0, None).unwrap();
        let low = half.forward(tokens(&IDS, 2), 0, None).unwrap();
        assert_eq!(low.dtype(), DType::BF16);
        let scale: f32 = full.clone().abs().max().into_scalar();
        let diff = max_diff(full, low.cast(FloatDType::F32));
        // bf16 rounding through 3 layers: a few percent of the logit scale, never zero.
        assert!(
            diff > 0.0 && diff <= 5e-2 * scale,
            "diff {diff}, scale {scale}"
        );
    }
}

/// On Flex f32 a position's logits do not depend on how many positions share the pass (up to
/// `rows::MAX_ROWS`): a multi-row pass over the cache, as self-speculative verification runs it,
/// computes bit for bit what one-token decoding computes. The shapes are the default model's
/// (a 768-feature `down_proj` input, where gemm's blocked sums and its matrix-vector path
/// disagree in the last bits), tied and untied heads.
#[test]
fn flex_logits_are_bit_identical_one_row_or_many() {
    for tied in [true, false] {
        let config = LlamaConfig {
            vocab_size: 300,
            hidden_size: 256,
            intermediate_size: 768,
            num_layers: 2,
            num_heads: 8,
            num_kv_heads: 4,
            head_dim: 32,
            max_position_embeddings: 64,
            ..config(tied)
        };
        let device = Default::default();
        B::seed(&device, 11);
        let model = LlamaModel::<B>::init_with_std(&config, 0.1, &device).unwrap();
        let tokens: Vec<u32> = (0..14).map(|i| (i * 37 + 5) % 300).collect();
        let layers = 0..config.num_layers;
        let logits = |ids: &[u32], start: usize, cache: &mut KvCache<B>| {
            let x = model.embed_ids(ids);
            let h = model
                .forward_layers(x, layers.clone(), start, Some(cache))
                .unwrap();
            model.exit_head(h).into_data().to_vec::<f32>().unwrap()
        };
        let mut one = KvCache::new(&config, 1, 64, &device);
        let singles: Vec<f32> = (0..tokens.len())
            .flat_map(|i| logits(&tokens[i..i + 1], i, &mut one))
            .collect();
        for rows in [2, 5, 9] {
            let mut many = KvCache::new(&config, 1, 64, &device);
            let mut got = Vec::new();
            for i in 0..4 {
                got.extend(logits(&tokens[i..i + 1], i, &mut many));
            }
            got.extend(logits(&tokens[4..4 + rows], 4, &mut many));
            let want = &singles[..got.len()];
            let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
            assert_eq!(first_diff, None, "tied {tied}, {rows} rows");
        }
    }
}

/// The exit head over a vocabulary prefix is the first columns of the full head, bit for bit
/// (tied: a view of the embedding's first rows; untied: the LM head's first columns), and a
/// prefix that is empty or longer than the vocabulary is an error.
#[test]
fn exit_head_prefix_is_the_first_columns_of_the_full_head() {
    for tied in [true, false] {
        let model = model(tied);
        let h = model
            .forward_layers(model.embed_ids(&[3, 1, 4]), 0..2, 0, None)
            .unwrap();
        let full = model
            .exit_head(h.clone())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for n in [1, 17, 50] {
            let part = model.exit_head_prefix(h.clone(), n).unwrap();
            assert_eq!(part.dims(), [1, 3, n]);
            let part = part.into_data().to_vec::<f32>().unwrap();
            for row in 0..3 {
                assert_eq!(
                    &part[row * n..(row + 1) * n],
                    &full[row * 50..row * 50 + n],
                    "tied {tied}, prefix {n}, row {row}"
                );
            }
        }
        for bad in [0, 51] {
            let err = model.exit_head_prefix(h.clone(), bad).unwrap_err();
            assert!(
                matches!(err, ModelError::VocabPrefix { requested, vocab_size: 50 } if requested == bad)
            );
        }
    }
}

/// A renumbered vocabulary computes the same logits in the new order: token `t` of the
/// reordered model is token `order[t]` of the original, with a tied or an untied head; an order
/// that does not list every token once is refused.
#[test]
fn a_reordered_vocabulary_permutes_the_logits() {
    // 7 is prime to 50: a permutation.
    let order: Vec<usize> = (0..50).map(|t| (t * 7 + 3) % 50).collect();
    let mut new_of = [0usize; 50];
    for (t, &old) in order.iter().enumerate() {
        new_of[old] = t;
    }
    for tied in [false, true] {
        let m = model(tied);
        // Reading every parameter before cloning: both copies hold the same values.
        let want = m.forward(tokens(&IDS, 1), 0, None).unwrap();
        let want = want.into_data().to_vec::<f32>().unwrap();
        let reordered = m.clone().reorder_vocab(&order).unwrap();
        let ids: Vec<i64> = IDS.iter().map(|&i| new_of[i as usize] as i64).collect();
        let got = reordered.forward(tokens(&ids, 1), 0, None).unwrap();
        let got = got.into_data().to_vec::<f32>().unwrap();
        for p in 0..IDS.len() {
            for (t, &old) in order.iter().enumerate() {
                assert_eq!(got[p * 50 + t], want[p * 50 + old], "tied {tied} {p} {t}");
            }
        }
        for bad in [vec![0; 50], (0..49).collect::<Vec<_>>(), (1..51).collect()] {
            let err = m.clone().reorder_vocab(&bad).unwrap_err().to_string();
            assert!(err.contains("each of the 50 token ids once"), "{err}");
        }
    }
}

/// The tensors of a saved model's safetensors, as f32 values by name.
fn saved_tensors(m: &LlamaModel<B>, dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    m.save_pretrained(dir, SaveDtype::F32).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// Checkpoint averaging: every saved tensor of the average of three models is the mean of
/// theirs, computed here element by element from their saved files; one model averages to
/// itself; differing configurations and no models are errors.
#[test]
fn an_average_of_models_holds_the_mean_of_their_weights() {
    let dir = std::env::temp_dir().join(format!("layerskip-average-{}", std::process::id()));
    let device = Default::default();
    for tied in [true, false] {
        let models: Vec<LlamaModel<B>> = (0..3)
            .map(|seed| {
                B::seed(&device, 100 + seed);
                LlamaModel::init(&config(tied), &device).unwrap()
            })
            .collect();
        let saved: Vec<_> = models.iter().map(|m| saved_tensors(m, &dir)).collect();
        let mean = LlamaModel::average(models).unwrap();
        let got = saved_tensors(&mean, &dir);
        assert_eq!(got.len(), saved[0].len());
        for (t, (name, values)) in got.iter().enumerate() {
            assert_eq!(name, &saved[0][t].0);
            for (i, &v) in values.iter().enumerate() {
                let (a, b, c) = (saved[0][t].1[i], saved[1][t].1[i], saved[2][t].1[i]);
                let want = (a + b + c) / 3.0;
                // Rounding in another order of the sum: relative to the terms, not the mean.
                assert!(
                    (v - want).abs() <= 1e-6 * (a.abs() + b.abs() + c.abs()),
                    "tied {tied} {name}[{i}]: {v} vs {want}"
                );
            }
        }
        let one = model(tied);
        let want = one.forward(tokens(&IDS, 1), 0, None).unwrap();
        let same = LlamaModel::average(vec![one]).unwrap();
        let got = same.forward(tokens(&IDS, 1), 0, None).unwrap();
        assert_eq!(max_diff(got, want), 0.0);
    }
    let err = LlamaModel::average(vec![model(true), model(false)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("same configuration: model 2"), "{err}");
    let err = LlamaModel::<B>::average(Vec::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no models"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
