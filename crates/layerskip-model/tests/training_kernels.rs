//! The fused training kernels against Burn's own ops: the loss and every gradient of the exit
//! head's cross-entropy under `Autodiff<Flex>` (the fused kernel and its registered backward)
//! against the same loss composed of Burn ops (`ops::burn_ops`, differentiated by Burn), on a
//! tied and an untied head, in f32 and under bf16 mixed precision, with masked positions.

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::nn::RmsNorm;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use layerskip_model::ops::{Head, burn_ops};
use layerskip_model::{LayerSkipBackend, LlamaConfig, LlamaModel, RopeConfig};

type A = Autodiff<Flex>;

fn config(tied: bool) -> LlamaConfig {
    LlamaConfig {
        // More positions than one chunk of the fused kernel (256 rows) below.
        vocab_size: 301,
        hidden_size: 40,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 10,
        max_position_embeddings: 512,
        rms_norm_eps: 1e-5,
        rope: RopeConfig {
            theta: 10_000.0,
            llama3_scaling: None,
        },
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_ids: vec![2],
    }
}

/// The loss and the gradients of the hidden state, the final norm's gain and the head weight.
/// How the head computes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Precision {
    F32,
    /// The model and activations cast to bf16.
    Bf16Cast,
    /// f32 tensors, bf16 operands in the products (`LlamaModel::with_bf16_products`).
    Bf16Products,
}

fn loss_and_grads(
    model: &LlamaModel<A>,
    fused: bool,
    precision: Precision,
) -> (f32, [Vec<f32>; 3]) {
    let device = Default::default();
    let (batch, seq, vocab) = (3, 100, model.config().vocab_size);
    let bf16 = precision == Precision::Bf16Cast;
    let compute = match precision {
        Precision::F32 => model.clone(),
        Precision::Bf16Cast => model.cast(FloatDType::BF16),
        Precision::Bf16Products => model.clone().with_bf16_products(),
    };
    let dims = [batch, seq, model.config().hidden_size];
    let hidden = Tensor::<A, 3>::from_data(
        TensorData::new(values(dims.iter().product(), 11), dims),
        &device,
    )
    .require_grad();
    let ids: Vec<i64> = (0..batch * seq).map(|i| (i * 37 % vocab) as i64).collect();
    let targets = Tensor::<A, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
    let mask: Vec<f32> = (0..batch * seq)
        .map(|i| if i % 9 == 4 { 0.0 } else { 1.0 })
        .collect();
    let mask = Tensor::<A, 2>::from_data(TensorData::new(mask, [batch, seq]), &device);
    let weights = mask.clone() / mask.sum().unsqueeze::<2>();
    let x = if bf16 {
        hidden.clone().cast(FloatDType::BF16)
    } else {
        hidden.clone()
    };
    let loss = if fused {
        compute.exit_cross_entropy(x, targets, weights)
    } else {
        let hidden_size = model.config().hidden_size;
        let normed = A::rms_norm(compute.norm(), x).reshape([batch * seq, hidden_size]);
        let head = match compute.lm_head() {
            Some(linear) => Head::Untied(linear.weight.val()),
            None => Head::Tied(compute.embed_tokens().val()),
        };
        burn_ops::exit_cross_entropy(
            normed,
            head,
            targets.reshape([batch * seq]),
            weights.reshape([batch * seq]),
        )
    };
    // A loss scaled on its way to backward: the registered step must scale its gradients.
    let grads = (loss.clone() * 2.5).backward();
    let flat =
        |t: Option<Tensor<Flex, 2>>| t.expect("a gradient").into_data().iter::<f32>().collect();
    let head_weight = match model.lm_head() {
        Some(linear) => linear.weight.val(),
        None => model.embed_tokens().val(),
    };
    let gain = model
        .norm()
        .gamma
        .val()
        .grad(&grads)
        .expect("the gain's gradient");
    (
        loss.into_scalar(),
        [
            hidden
                .grad(&grads)
                .expect("the hidden state's gradient")
                .into_data()
                .iter()
                .collect(),
            gain.into_data().iter().collect(),
            flat(head_weight.grad(&grads)),
        ],
    )
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: all zero");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

#[test]
fn fused_head_cross_entropy_matches_burns_gradients() {
    let device = Default::default();
    // f32: both sides compute the logits in f32 (different summation orders); bf16 cast: the
    // fused kernel widens the bf16 values and accumulates in f32, Burn's bf16 matmul rounds its
    // logits to bf16 before the f32 log-softmax, and both round the gradients to bf16; bf16
    // products against Burn in f32: operands (the logits' gradient included) rounded to bf16.
    let cases = [
        (Precision::F32, Precision::F32, 2e-5),
        (Precision::Bf16Cast, Precision::Bf16Cast, 3e-2),
        (Precision::Bf16Products, Precision::F32, 2e-2),
    ];
    for (precision, reference, rel) in cases {
        if precision == Precision::Bf16Products && !A::bf16_products() {
            continue;
        }
        for tied in [true, false] {
            A::seed(&device, 3);
            let model = LlamaModel::<A>::init_with_std(&config(tied), 0.3, &device).unwrap();
            let (loss, grads) = loss_and_grads(&model, true, precision);
            let (want, want_grads) = loss_and_grads(&model, false, reference);
            let case = format!("tied {tied}, {precision:?}");
            assert!(
                (loss - want).abs() <= rel * want.abs(),
                "{case}: loss {loss} vs {want}"
            );
            for (name, (g, w)) in ["d hidden", "d norm gain", "d head weight"]
                .iter()
                .zip(grads.iter().zip(&want_grads))
            {
                assert_close(&format!("{case}: {name}"), g, w, rel);
            }
        }
    }
}

/// Pseudo-random `[batch, seq, heads, head_dim]` activations that require gradients, from a
/// local generator (the tests of this file run in parallel; Burn's seed is process-wide).
fn activations(dims: [usize; 4], seed: u64) -> Tensor<A, 4> {
    let n = dims.iter().product();
    Tensor::<A, 4>::from_data(TensorData::new(values(n, seed), dims), &Default::default())
        .require_grad()
}

/// `n` values in [-1, 1) from xorshift64 seeded with `seed`.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The attention's output and the gradients of `sum(out * w)` (a fixed random `w`) with respect
/// to q, k and v, by `attend` on `Autodiff<Flex>`.
fn attention_grads(
    attend: impl Fn(Tensor<A, 4>, Tensor<A, 4>, Tensor<A, 4>) -> Tensor<A, 3>,
    bf16: bool,
) -> [Vec<f32>; 4] {
    let (b, s, heads, kv, d) = (2, 37, 6, 2, 8);
    let [q, k, v] = [
        activations([b, s, heads, d], 1),
        activations([b, s, kv, d], 2),
        activations([b, s, kv, d], 3),
    ];
    let cast = |t: &Tensor<A, 4>| {
        if bf16 {
            t.clone().cast(FloatDType::BF16)
        } else {
            t.clone()
        }
    };
    let out = attend(cast(&q), cast(&k), cast(&v)).cast(FloatDType::F32);
    let w = activations([b, s, heads, d], 4)
        .reshape([b, s, heads * d])
        .detach();
    let grads = (out.clone() * w).sum().backward();
    let flat = |t: Tensor<Flex, 4>| t.into_data().iter::<f32>().collect::<Vec<_>>();
    [
        out.into_data().iter::<f32>().collect(),
        flat(q.grad(&grads).expect("dq")),
        flat(k.grad(&grads).expect("dk")),
        flat(v.grad(&grads).expect("dv")),
    ]
}

#[test]
fn fused_self_attention_matches_burns_gradients() {
    for (bf16, rel) in [(false, 2e-5), (true, 3e-2)] {
        let fused = attention_grads(A::self_attention, bf16);
        let burn = attention_grads(burn_ops::self_attention, bf16);
        for (name, (g, w)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(fused.iter().zip(&burn))
        {
            assert_close(&format!("bf16 {bf16}: {name}"), g, w, rel);
        }
    }
}

#[test]
fn burn_ops_attention_backward_matches_autodiff() {
    // The default backward (what a backend with only a forward kernel would use), on Flex,
    // against Burn's autodiff of the attention, from Flex's fused forward.
    let want = attention_grads(burn_ops::self_attention, false);
    let (b, s, heads, kv, d) = (2, 37, 6, 2, 8);
    let inner = |t: Tensor<A, 4>| t.inner();
    let [q, k, v] = [
        inner(activations([b, s, heads, d], 1)),
        inner(activations([b, s, kv, d], 2)),
        inner(activations([b, s, kv, d], 3)),
    ];
    let w = activations([b, s, heads, d], 4)
        .inner()
        .reshape([b, s, heads * d]);
    let forward = Flex::self_attention_forward(q.clone(), k.clone(), v.clone()).expect("f32");
    let grads = burn_ops::self_attention_backward([q, k, v], forward, w);
    for (name, (g, w)) in ["dq", "dk", "dv"]
        .iter()
        .zip(grads.into_iter().zip(&want[1..]))
    {
        assert_close(
            name,
            &g.into_data().iter::<f32>().collect::<Vec<_>>(),
            w,
            2e-5,
        );
    }
}

/// Gradients of `sum(f(inputs) * w)` with respect to each input, by `Autodiff<Flex>`.
fn input_grads<const D: usize, const N: usize>(
    f: impl Fn([Tensor<A, D>; N]) -> Tensor<A, D>,
    dims: [usize; D],
) -> Vec<Vec<f32>> {
    let device = Default::default();
    let n = dims.iter().product();
    let make = |seed| {
        Tensor::<A, D>::from_data(TensorData::new(values(n, seed), dims), &device).require_grad()
    };
    let inputs: [Tensor<A, D>; N] = std::array::from_fn(|i| make(20 + i as u64));
    let w = Tensor::<A, D>::from_data(TensorData::new(values(n, 9), dims), &device);
    let out = f(inputs.clone());
    let grads = (out.clone() * w).sum().backward();
    let mut all = vec![out.into_data().iter::<f32>().collect()];
    for t in inputs {
        all.push(
            t.grad(&grads)
                .expect("a gradient")
                .into_data()
                .iter::<f32>()
                .collect(),
        );
    }
    all
}

#[test]
fn fused_silu_mul_and_rope_match_burns_gradients() {
    let dims = [2, 9, 40];
    let fused = input_grads(|[g, u]| A::silu_mul(g, u), dims);
    let burn = input_grads(|[g, u]| burn_ops::silu_mul(g, u), dims);
    for (name, (g, w)) in ["silu_mul", "d gate", "d up"]
        .iter()
        .zip(fused.iter().zip(&burn))
    {
        assert_close(name, g, w, 2e-6);
    }
    A::seed(&Default::default(), 3);
    let model = LlamaModel::<A>::init(&config(true), &Default::default()).unwrap();
    let tables = model.rope_tables(3, 9);
    let dims = [2, 9, 4, 10];
    let fused = input_grads(|[x]| A::rope(x, &tables), dims);
    let burn = input_grads(|[x]| burn_ops::rope(x, &tables), dims);
    for (name, (g, w)) in ["rope", "d x"].iter().zip(fused.iter().zip(&burn)) {
        assert_close(name, g, w, 2e-6);
    }
}

#[test]
fn burn_ops_silu_mul_and_rope_backward_match_autodiff() {
    // The defaults other backends get, against Burn's autodiff of the forward ops.
    let dims = [2, 9, 40];
    let want = input_grads(|[g, u]| burn_ops::silu_mul(g, u), dims);
    let t = |seed| {
        Tensor::<Flex, 3>::from_data(
            TensorData::new(values(720, seed), dims),
            &Default::default(),
        )
    };
    let got = burn_ops::silu_mul_backward(t(20), t(21), t(9));
    for (name, (g, w)) in ["d gate", "d up"]
        .iter()
        .zip(got.into_iter().zip(&want[1..]))
    {
        assert_close(
            name,
            &g.into_data().iter::<f32>().collect::<Vec<_>>(),
            w,
            2e-6,
        );
    }
    let model = LlamaModel::<Flex>::init(&config(true), &Default::default()).unwrap();
    let inner_tables = model.rope_tables(3, 9);
    let ad_model = LlamaModel::<A>::init(&config(true), &Default::default()).unwrap();
    let tables = ad_model.rope_tables(3, 9);
    let dims = [2, 9, 4, 10];
    let want = input_grads(|[x]| burn_ops::rope(x, &tables), dims);
    let dy =
        Tensor::<Flex, 4>::from_data(TensorData::new(values(720, 9), dims), &Default::default());
    let got = burn_ops::rope_backward(dy, &inner_tables);
    assert_close(
        "d x",
        &got.into_data().iter::<f32>().collect::<Vec<_>>(),
        &want[1],
        2e-6,
    );
}

#[test]
fn fused_rms_norm_matches_burns_gradients() {
    let device = Default::default();
    let h = 40;
    // A gain away from 1, so that its gradient and its part in dx are both exercised.
    let gain = |d: &_| Tensor::<A, 1>::from_data(TensorData::new(values(h, 5), [h]), d) + 1.5;
    let norm = RmsNorm {
        gamma: Param::from_tensor(gain(&device)),
        epsilon: 1e-5,
    };
    // Rows past one block of the kernel's gain sums (64 rows).
    let dims = [3, 29, h];
    let run = |fused: bool| {
        let mut all = input_grads(
            |[x]| {
                if fused {
                    A::rms_norm(&norm, x)
                } else {
                    norm.forward(x)
                }
            },
            dims,
        );
        // The gain's gradient of the same loss.
        let x = Tensor::<A, 3>::from_data(TensorData::new(values(3 * 29 * h, 20), dims), &device);
        let w = Tensor::<A, 3>::from_data(TensorData::new(values(3 * 29 * h, 9), dims), &device);
        let out = if fused {
            A::rms_norm(&norm, x)
        } else {
            norm.forward(x)
        };
        let grads = (out * w).sum().backward();
        all.push(
            norm.gamma
                .val()
                .grad(&grads)
                .expect("d gain")
                .into_data()
                .iter()
                .collect(),
        );
        all
    };
    let (fused, burn) = (run(true), run(false));
    for (name, (g, w)) in ["rms_norm", "d x", "d gain"]
        .iter()
        .zip(fused.iter().zip(&burn))
    {
        assert_close(name, g, w, 1e-5);
    }
    // The default backward other backends get, on Flex, against the same autodiff gradients.
    let inner = RmsNorm {
        gamma: Param::from_tensor(norm.gamma.val().inner()),
        epsilon: 1e-5,
    };
    let t = |seed| {
        Tensor::<Flex, 3>::from_data(TensorData::new(values(3 * 29 * h, seed), dims), &device)
    };
    let (dx, d_gain) = burn_ops::rms_norm_backward(&inner, t(20), t(9));
    assert_close(
        "default d x",
        &dx.into_data().iter::<f32>().collect::<Vec<_>>(),
        &burn[1],
        1e-5,
    );
    assert_close(
        "default d gain",
        &d_gain.into_data().iter::<f32>().collect::<Vec<_>>(),
        &burn[2],
        1e-5,
    );
}

/// Values that bf16 holds exactly, so that a product with bf16 operands computes the same
/// products as f32 and differs only in the order of its sums.
fn bf16_exact(n: usize, seed: u64) -> Vec<f32> {
    values(n, seed)
        .into_iter()
        .map(|v| (v * 64.0).round() / 64.0)
        .collect()
}

/// The fused linear product (f32, and bf16 operands) and its registered backward against Burn's
/// matmul differentiated by Burn, on values bf16 holds exactly (the bf16 kernel then multiplies
/// the same numbers and only sums in another order).
#[test]
fn fused_linear_matches_burns_matmul_gradients() {
    let device = Default::default();
    let (rows, k, n) = (37, 40, 45);
    let dy =
        Tensor::<A, 2>::from_data(TensorData::new(bf16_exact(rows * n, 3), [rows, n]), &device);
    let run = |f: &dyn Fn(Tensor<A, 2>, Tensor<A, 2>) -> Tensor<A, 2>| {
        let make = |v: Vec<f32>, dims: [usize; 2]| {
            Tensor::<A, 2>::from_data(TensorData::new(v, dims), &device).require_grad()
        };
        let x = make(bf16_exact(rows * k, 1), [rows, k]);
        let w = make(bf16_exact(k * n, 2), [k, n]);
        let y = f(x.clone(), w.clone());
        let grads = (y.clone() * dy.clone()).sum().backward();
        [
            y.into_data().iter::<f32>().collect::<Vec<_>>(),
            flat(x.grad(&grads)),
            flat(w.grad(&grads)),
        ]
    };
    let want = run(&|x, w| x.matmul(w));
    for bf16 in [false, true] {
        if bf16 && !A::bf16_products() {
            continue;
        }
        let got = run(&|x, w| A::linear_forward(x, w, bf16).expect("Flex takes f32"));
        for (name, (g, w)) in ["y", "dx", "dW"].iter().zip(got.iter().zip(&want)) {
            assert_close(&format!("{name} (bf16 {bf16})"), g, w, 1e-6);
        }
    }
}

fn flat(t: Option<Tensor<Flex, 2>>) -> Vec<f32> {
    t.expect("a gradient").into_data().iter::<f32>().collect()
}
