//! The CubeCL kernels on wgpu (lavapipe where there is no GPU) against scalar references in
//! f64, and the property self-speculation relies on: a row's result does not depend on the
//! other rows of the launch.
#![cfg(feature = "wgpu")]

use cubecl::ir::{ElemType, FloatKind, StorageType};
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use layerskip_kernels::cube::*;

type R = WgpuRuntime;
const F32: StorageType = StorageType::Scalar(ElemType::Float(FloatKind::F32));

struct Gpu {
    client: ComputeClient<R>,
}

/// A device buffer and its shape.
struct Buf {
    handle: Handle,
    shape: Vec<usize>,
}

impl Gpu {
    fn new() -> Self {
        Self {
            client: R::client(&WgpuDevice::default()),
        }
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Buf {
        assert_eq!(data.len(), shape.iter().product::<usize>());
        Buf {
            handle: self.client.create_from_slice(f32::as_bytes(data)),
            shape: shape.to_vec(),
        }
    }

    fn zeros(&self, shape: &[usize]) -> Buf {
        self.upload(&vec![0.0; shape.iter().product()], shape)
    }

    fn arg(&self, buf: &Buf) -> TensorArg<R> {
        let mut strides = vec![1usize; buf.shape.len()];
        for d in (0..buf.shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * buf.shape[d + 1];
        }
        // SAFETY: contiguous strides of the buffer's own shape.
        unsafe {
            TensorArg::from_raw_parts(buf.handle.clone(), strides.into(), buf.shape.clone().into())
        }
    }

    fn read(&self, buf: &Buf) -> Vec<f32> {
        let bytes = self.client.read_one_unchecked(buf.handle.clone());
        f32::from_bytes(&bytes).to_vec()
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn rms_norm_matches_the_formula() {
    let gpu = Gpu::new();
    let (rows, h) = (3, 300);
    let x = values(rows * h, 1);
    let gamma = values(h, 2);
    let (xb, gb, ob) = (
        gpu.upload(&x, &[rows, h]),
        gpu.upload(&gamma, &[h]),
        gpu.zeros(&[rows, h]),
    );
    launch_rms_norm(
        &gpu.client,
        gpu.arg(&xb),
        gpu.arg(&gb),
        gpu.arg(&ob),
        rows,
        h,
        1e-5,
        F32,
    );
    let want: Vec<f64> = (0..rows * h)
        .map(|i| {
            let row = &x[i / h * h..][..h];
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / h as f64;
            x[i] as f64 / (ms + 1e-5).sqrt() * gamma[i % h] as f64
        })
        .collect();
    assert_close(&gpu.read(&ob), &want, 1e-5, "rms_norm");
}

#[test]
fn silu_mul_matches_the_formula() {
    let gpu = Gpu::new();
    let n = 1000;
    let (g, u) = (values(n, 3), values(n, 4));
    let g: Vec<f32> = g.iter().map(|v| v * 8.0).collect();
    let (gb, ub, ob) = (gpu.upload(&g, &[n]), gpu.upload(&u, &[n]), gpu.zeros(&[n]));
    launch_silu_mul(
        &gpu.client,
        gpu.arg(&gb),
        gpu.arg(&ub),
        gpu.arg(&ob),
        n,
        F32,
    );
    let want: Vec<f64> = (0..n)
        .map(|i| {
            let g = g[i] as f64;
            g / (1.0 + (-g).exp()) * u[i] as f64
        })
        .collect();
    assert_close(&gpu.read(&ob), &want, 1e-5, "silu_mul");
}

/// `x * cos + rotate_half(x) * sin` for `x` `[seq, heads, dim]`, tables `[seq, dim]`.
fn rope_reference(x: &[f32], cos: &[f32], sin: &[f32], [seq, heads, dim]: [usize; 3]) -> Vec<f64> {
    let half = dim / 2;
    (0..seq * heads * dim)
        .map(|i| {
            let (j, t) = (i % dim, i / (heads * dim));
            let rot = if j < half {
                -(x[i + half] as f64)
            } else {
                x[i - half] as f64
            };
            x[i] as f64 * cos[t * dim + j] as f64 + rot * sin[t * dim + j] as f64
        })
        .collect()
}

#[test]
fn rope_and_the_cache_write_rotate_in_the_rotate_half_layout() {
    let gpu = Gpu::new();
    let (seq, heads, kv_heads, dim, capacity, at) = (3, 4, 2, 8, 10, 5);
    let x = values(seq * heads * dim, 5);
    let (cos, sin) = (values(seq * dim, 6), values(seq * dim, 7));
    let (cb, sb) = (gpu.upload(&cos, &[seq, dim]), gpu.upload(&sin, &[seq, dim]));
    let (xb, ob) = (
        gpu.upload(&x, &[1, seq, heads, dim]),
        gpu.zeros(&[1, seq, heads, dim]),
    );
    let (xa, ca, sa, oa) = (gpu.arg(&xb), gpu.arg(&cb), gpu.arg(&sb), gpu.arg(&ob));
    launch_rope(&gpu.client, xa, ca, sa, oa, [1, seq, heads, dim], F32);
    let want = rope_reference(&x, &cos, &sin, [seq, heads, dim]);
    assert_close(&gpu.read(&ob), &want, 1e-6, "rope");

    let (k, v) = (
        values(seq * kv_heads * dim, 8),
        values(seq * kv_heads * dim, 9),
    );
    let shape = [1, seq, kv_heads, dim];
    let (kb, vb) = (gpu.upload(&k, &shape), gpu.upload(&v, &shape));
    let cache = [1, kv_heads, capacity, dim];
    let (kc, vc) = (gpu.zeros(&cache), gpu.zeros(&cache));
    let to = StoreAt {
        key_cache: gpu.arg(&kc),
        value_cache: gpu.arg(&vc),
        capacity,
        at,
    };
    let (ka, va, ca, sa) = (gpu.arg(&kb), gpu.arg(&vb), gpu.arg(&cb), gpu.arg(&sb));
    launch_store_kv(&gpu.client, ka, va, ca, sa, to, shape, F32);
    let rotated = rope_reference(&k, &cos, &sin, [seq, kv_heads, dim]);
    let (got_k, got_v) = (gpu.read(&kc), gpu.read(&vc));
    for g in 0..kv_heads {
        for p in 0..capacity {
            for j in 0..dim {
                let o = (g * capacity + p) * dim + j;
                if (at..at + seq).contains(&p) {
                    let s = ((p - at) * kv_heads + g) * dim + j;
                    assert!(
                        (got_k[o] as f64 - rotated[s]).abs() < 1e-6,
                        "key {g} {p} {j}"
                    );
                    assert_eq!(got_v[o], v[s], "value {g} {p} {j}");
                } else {
                    assert_eq!((got_k[o], got_v[o]), (0.0, 0.0), "untouched {g} {p} {j}");
                }
            }
        }
    }
}

/// Causal GQA softmax attention in f64: `q` `[seq, heads, dim]`, caches `[kv_heads, capacity,
/// dim]`, row `i` seeing positions `0..=start + i`.
fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [seq, heads, groups, dim, capacity, start]: [usize; 6],
) -> Vec<f64> {
    let mut out = vec![0.0; seq * heads * dim];
    for i in 0..seq {
        for h in 0..heads {
            let base = h / groups * capacity * dim;
            let qr = &q[(i * heads + h) * dim..][..dim];
            let scores: Vec<f64> = (0..=start + i)
                .map(|t| {
                    let kr = &k[base + t * dim..][..dim];
                    qr.iter()
                        .zip(kr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        / (dim as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for j in 0..dim {
                out[(i * heads + h) * dim + j] = (0..weights.len())
                    .map(|t| weights[t] * v[base + t * dim + j] as f64)
                    .sum::<f64>()
                    / total;
            }
        }
    }
    out
}

/// Attention of `q` (rotated in the kernel with the tables `[cos, sin]`).
fn attend(
    gpu: &Gpu,
    q: &[f32],
    tables: [&[f32]; 2],
    k: &Buf,
    v: &Buf,
    args: AttendArgs,
) -> Vec<f32> {
    let shape = [1, args.seq, args.heads, args.dim];
    let (qb, ob) = (gpu.upload(q, &shape), gpu.zeros(&shape));
    let [cb, sb] = tables.map(|t| gpu.upload(t, &[args.seq, args.dim]));
    let bufs = [&qb, &cb, &sb, k, v, &ob].map(|b| gpu.arg(b));
    launch_attend(&gpu.client, bufs, args, F32);
    gpu.read(&ob)
}

/// Over several chunks of keys (online softmax), grouped heads, an offset start, the query
/// rotated on load; each row equals the same row attended alone, bit for bit.
#[test]
fn attention_over_the_cache_matches_softmax_attention_row_by_row() {
    let gpu = Gpu::new();
    let (heads, groups, dim, capacity) = (6, 3, 48, 1400);
    for (seq, start) in [(1, 0), (4, 1100), (3, 9)] {
        let kv = [1, heads / groups, capacity, dim];
        let (k, v) = (
            values(capacity * dim * 2, 10),
            values(capacity * dim * 2, 11),
        );
        let (kb, vb) = (gpu.upload(&k, &kv), gpu.upload(&v, &kv));
        let q: Vec<f32> = values(seq * heads * dim, 12)
            .iter()
            .map(|x| x * 4.0)
            .collect();
        let (cos, sin) = (values(seq * dim, 17), values(seq * dim, 18));
        let scale = 1.0 / (dim as f32).sqrt();
        let args = AttendArgs {
            batch: 1,
            seq,
            heads,
            groups,
            dim,
            capacity,
            start,
            scale,
        };
        let got = attend(&gpu, &q, [&cos, &sin], &kb, &vb, args);
        let rotated: Vec<f32> = rope_reference(&q, &cos, &sin, [seq, heads, dim])
            .iter()
            .map(|&x| x as f32)
            .collect();
        let shape = [seq, heads, groups, dim, capacity, start];
        let want = attention_reference(&rotated, &k, &v, shape);
        assert_close(
            &got,
            &want,
            2e-5,
            &format!("attention seq {seq} start {start}"),
        );
        for i in 0..seq {
            let row = &q[i * heads * dim..][..heads * dim];
            let one = AttendArgs {
                seq: 1,
                start: start + i,
                ..args
            };
            let tables = [&cos[i * dim..][..dim], &sin[i * dim..][..dim]];
            let alone = attend(&gpu, row, tables, &kb, &vb, one);
            assert_eq!(
                alone,
                got[i * heads * dim..][..heads * dim],
                "row {i} alone"
            );
        }
    }
}

/// f64 RMSNorm of `rows` rows of `x` (`[rows, k]`) with gain `gamma`, eps 1e-5.
fn rms_reference(x: &[f32], gamma: &[f32], rows: usize, k: usize) -> Vec<f64> {
    (0..rows * k)
        .map(|i| {
            let row = &x[i / k * k..][..k];
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
            x[i] as f64 / (ms + 1e-5).sqrt() * gamma[i % k] as f64
        })
        .collect()
}

/// `a · W` in f64 for `a` `[rows, k]` and `W` `[k, n]`.
fn product_reference(a: &[f64], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f64> {
    (0..rows * n)
        .map(|i| {
            (0..k)
                .map(|f| a[i / n * k + f] * w[f * n + i % n] as f64)
                .sum()
        })
        .collect()
}

/// One [`launch_fused_rows`] call on `rows` rows of `x`; returns the three outputs.
fn fused(
    gpu: &Gpu,
    x: &[f32],
    gamma: &Buf,
    residual: &[f32],
    ws: &[Buf; 3],
    shape: [usize; 2],
    (norm, epilogue, out_in): (bool, Epilogue, bool),
) -> [Vec<f32>; 3] {
    let [rows, k] = shape;
    let widths = widths_of(ws);
    // The `[out, in]` kernel reads the same weights transposed.
    let transposed = |b: &Buf| {
        if b.shape[0] == 0 {
            return gpu.zeros(&[0, 0]);
        }
        let (w, n) = (gpu.read(b), b.shape[1]);
        let t: Vec<f32> = (0..n * k).map(|i| w[i % k * n + i / k]).collect();
        gpu.upload(&t, &[n, k])
    };
    let ws_t;
    let ws = if out_in {
        ws_t = [&ws[0], &ws[1], &ws[2]].map(transposed);
        &ws_t
    } else {
        ws
    };
    let xb = gpu.upload(&x[..rows * k], &[rows, k]);
    let rb = gpu.upload(&residual[..rows * widths[0]], &[rows, widths[0]]);
    let outs = widths.map(|n| gpu.zeros(&[rows, n.max(1)]));
    let tensors = FusedRows {
        x: gpu.arg(&xb),
        gamma: gpu.arg(gamma),
        residual: gpu.arg(&rb),
        weights: [gpu.arg(&ws[0]), gpu.arg(&ws[1]), gpu.arg(&ws[2])],
        outputs: [gpu.arg(&outs[0]), gpu.arg(&outs[1]), gpu.arg(&outs[2])],
    };
    let eps = norm.then_some(1e-5);
    if out_in {
        launch_fused_out_in(&gpu.client, tensors, shape, widths, eps, epilogue, F32);
    } else {
        launch_fused_rows(&gpu.client, tensors, shape, widths, eps, epilogue, F32);
    }
    outs.map(|o| gpu.read(&o))
}

/// The weights' output widths (0 for an empty placeholder).
fn widths_of(ws: &[Buf; 3]) -> [usize; 3] {
    [0, 1, 2].map(|i| {
        if ws[i].shape[0] == 0 {
            0
        } else {
            ws[i].shape[1]
        }
    })
}

/// The fused products against f64: RMSNorm then three weights in one launch (q, k, v), a
/// residual added, SwiGLU's product; for one row and several (a partial last pass), each row
/// equal to itself computed alone; both feature splits (few and many column tiles); widths
/// that take vectors of 4 columns, of 2 and of 1.
#[test]
fn fused_products_match_f64_and_do_not_depend_on_the_other_rows() {
    let gpu = Gpu::new();
    let k = 96;
    let x: Vec<f32> = values(7 * k, 20).iter().map(|v| v * 3.0).collect();
    let gamma = values(k, 21);
    let gb = gpu.upload(&gamma, &[k]);
    for widths in [[200, 40, 40], [8200, 0, 0], [66, 10, 10], [37, 0, 0]] {
        let ws: Vec<Vec<f32>> = widths
            .iter()
            .enumerate()
            .map(|(i, &n)| values(k * n, 22 + i as u64))
            .collect();
        let bufs = [0, 1, 2].map(|i| {
            if widths[i] == 0 {
                gpu.zeros(&[0, 0])
            } else {
                gpu.upload(&ws[i], &[k, widths[i]])
            }
        });
        let residual = values(7 * widths[0], 25);
        for (norm, epilogue) in [
            (false, Epilogue::Plain),
            (true, Epilogue::Plain),
            (false, Epilogue::Residual),
            (true, Epilogue::SwiGlu),
        ] {
            if epilogue == Epilogue::SwiGlu && widths[1] != widths[0] {
                let gu = [
                    gpu.upload(&ws[0], &[k, widths[0]]),
                    gpu.upload(&values(k * widths[0], 26), &[k, widths[0]]),
                    gpu.zeros(&[0, 0]),
                ];
                check_fused(&gpu, &x, &gb, &gamma, &residual, &gu, k, norm, epilogue);
                continue;
            }
            check_fused(&gpu, &x, &gb, &gamma, &residual, &bufs, k, norm, epilogue);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check_fused(
    gpu: &Gpu,
    x: &[f32],
    gb: &Buf,
    gamma: &[f32],
    residual: &[f32],
    ws: &[Buf; 3],
    k: usize,
    norm: bool,
    epilogue: Epilogue,
) {
    let widths = widths_of(ws);
    let host: Vec<Vec<f32>> = ws
        .iter()
        .map(|b| {
            if b.shape[0] == 0 {
                Vec::new()
            } else {
                gpu.read(b)
            }
        })
        .collect();
    for out_in in [false, true] {
        let mut alone: Option<[Vec<f32>; 3]> = None;
        for rows in [1, 7] {
            let got = fused(
                gpu,
                x,
                gb,
                residual,
                ws,
                [rows, k],
                (norm, epilogue, out_in),
            );
            let a: Vec<f64> = if norm {
                rms_reference(x, gamma, rows, k)
            } else {
                x[..rows * k].iter().map(|&v| v as f64).collect()
            };
            let what = format!(
                "{epilogue:?} norm {norm} [out, in] {out_in} widths {widths:?} rows {rows}"
            );
            let product = |i: usize| product_reference(&a, &host[i], rows, k, widths[i]);
            match epilogue {
                Epilogue::Plain => {
                    for i in 0..3 {
                        if widths[i] > 0 {
                            assert_close(&got[i], &product(i), 1e-4, &format!("{what} weight {i}"));
                        }
                    }
                }
                Epilogue::Residual => {
                    let want: Vec<f64> = product(0)
                        .iter()
                        .zip(residual)
                        .map(|(p, &r)| p + r as f64)
                        .collect();
                    assert_close(&got[0], &want, 1e-4, &what);
                }
                Epilogue::SwiGlu => {
                    let want: Vec<f64> = product(0)
                        .iter()
                        .zip(product(1))
                        .map(|(&g, u)| g / (1.0 + (-g).exp()) * u)
                        .collect();
                    assert_close(&got[0], &want, 1e-4, &what);
                }
            }
            match &alone {
                None => alone = Some(got),
                Some(one) => {
                    for i in 0..3 {
                        let n = widths[i];
                        assert_eq!(
                            got[i][..n],
                            one[i][..n],
                            "{what}: row 0 alone vs with 6 others ({i})"
                        );
                    }
                }
            }
        }
    }
}

/// The tied head `x · Eᵀ` (`E` `[vocab, k]`, the input RMSNorm'd first or not) against f64, a
/// column prefix, one row and several, each row equal to itself computed alone.
#[test]
fn head_products_match_f64_and_do_not_depend_on_the_other_rows() {
    let gpu = Gpu::new();
    let (vocab, k, cols) = (300, 80, 260);
    let e = values(vocab * k, 15);
    let eb = gpu.upload(&e, &[vocab, k]);
    let gamma = values(k, 19);
    let gb = gpu.upload(&gamma, &[k]);
    let x = values(5 * k, 16);
    for norm in [false, true] {
        let mut alone = Vec::new();
        for rows in [1, 5] {
            let (xb, ob) = (
                gpu.upload(&x[..rows * k], &[rows, k]),
                gpu.zeros(&[rows, cols]),
            );
            let scratch = gpu.zeros(&[1]);
            let tensors = FusedRows {
                x: gpu.arg(&xb),
                gamma: gpu.arg(&gb),
                residual: gpu.arg(&xb),
                weights: [gpu.arg(&eb), gpu.arg(&xb), gpu.arg(&xb)],
                outputs: [gpu.arg(&ob), gpu.arg(&scratch), gpu.arg(&scratch)],
            };
            let (widths, eps) = ([cols, 0, 0], norm.then_some(1e-5));
            let shape = [rows, k];
            launch_fused_out_in(
                &gpu.client,
                tensors,
                shape,
                widths,
                eps,
                Epilogue::Plain,
                F32,
            );
            let got = gpu.read(&ob);
            let a: Vec<f64> = if norm {
                rms_reference(&x, &gamma, rows, k)
            } else {
                x[..rows * k].iter().map(|&v| v as f64).collect()
            };
            let want: Vec<f64> = (0..rows * cols)
                .map(|i| {
                    (0..k)
                        .map(|f| a[i / cols * k + f] * e[i % cols * k + f] as f64)
                        .sum()
                })
                .collect();
            assert_close(
                &got,
                &want,
                1e-4,
                &format!("out_in norm {norm} rows {rows}"),
            );
            if rows == 1 {
                alone = got;
            } else {
                assert_eq!(got[..cols], alone[..], "head row 0 alone vs with 4 others");
            }
        }
    }
}

/// The q/k/v products with the keys and values stored in the cache in the same launch: the
/// queries, the cache positions `at..at + seq` of every sequence and the untouched rest equal,
/// bit for bit, what the unfused launches write (the products, then [`launch_store_kv`]), and
/// match f64; for one row (a decode step) and for two sequences of three (verification rows);
/// heads of 32 and of 64 features. Widths whose cubes would split a head are refused with
/// nothing written.
#[test]
fn the_products_store_keys_and_values_as_the_separate_cache_write_does() {
    let gpu = Gpu::new();
    let k = 96;
    let x: Vec<f32> = values(6 * k, 40).iter().map(|v| v * 3.0).collect();
    let gamma = values(k, 41);
    let gb = gpu.upload(&gamma, &[k]);
    let (capacity, at) = (10, 4);
    for (heads, kv_heads, dim) in [(4, 2, 32), (4, 2, 64)] {
        let widths = [heads * dim, kv_heads * dim, kv_heads * dim];
        let ws: Vec<Vec<f32>> = (0..3)
            .map(|i| values(k * widths[i], 42 + i as u64))
            .collect();
        let wb: [Buf; 3] = [0, 1, 2].map(|i| gpu.upload(&ws[i], &[k, widths[i]]));
        for (batch, seq) in [(1, 1), (2, 3)] {
            let rows = batch * seq;
            let what = format!("head_dim {dim} batch {batch} seq {seq}");
            let (cos, sin) = (values(seq * dim, 45), values(seq * dim, 46));
            let (cb, sb) = (gpu.upload(&cos, &[seq, dim]), gpu.upload(&sin, &[seq, dim]));
            let cache = [batch, kv_heads, capacity, dim];
            // Caches that already hold values: the launch must leave the other positions alone.
            let held = values(batch * kv_heads * capacity * dim, 47);
            let xb = gpu.upload(&x[..rows * k], &[rows, k]);

            // Fused: one launch.
            let (kc, vc) = (gpu.upload(&held, &cache), gpu.upload(&held, &cache));
            let qb = gpu.zeros(&[rows, widths[0]]);
            let tensors = FusedRows {
                x: gpu.arg(&xb),
                gamma: gpu.arg(&gb),
                residual: gpu.arg(&xb),
                weights: [gpu.arg(&wb[0]), gpu.arg(&wb[1]), gpu.arg(&wb[2])],
                outputs: [gpu.arg(&qb), gpu.arg(&qb), gpu.arg(&qb)],
            };
            let to = StoreAt {
                key_cache: gpu.arg(&kc),
                value_cache: gpu.arg(&vc),
                capacity,
                at,
            };
            let rope = [gpu.arg(&cb), gpu.arg(&sb)];
            let shape = [batch, seq, k];
            let eps = Some(1e-5);
            assert!(
                launch_fused_qkv_store(
                    &gpu.client,
                    tensors,
                    rope,
                    to,
                    shape,
                    dim,
                    widths,
                    eps,
                    F32
                ),
                "{what}: launched"
            );
            let (q, keys, vals) = (gpu.read(&qb), gpu.read(&kc), gpu.read(&vc));

            // Unfused: the products, then the cache write.
            let outs = widths.map(|n| gpu.zeros(&[rows, n]));
            let tensors = FusedRows {
                x: gpu.arg(&xb),
                gamma: gpu.arg(&gb),
                residual: gpu.arg(&xb),
                weights: [gpu.arg(&wb[0]), gpu.arg(&wb[1]), gpu.arg(&wb[2])],
                outputs: [gpu.arg(&outs[0]), gpu.arg(&outs[1]), gpu.arg(&outs[2])],
            };
            let plain = Epilogue::Plain;
            launch_fused_rows(&gpu.client, tensors, [rows, k], widths, eps, plain, F32);
            let (kc2, vc2) = (gpu.upload(&held, &cache), gpu.upload(&held, &cache));
            let to = StoreAt {
                key_cache: gpu.arg(&kc2),
                value_cache: gpu.arg(&vc2),
                capacity,
                at,
            };
            let (ka, va) = (gpu.arg(&outs[1]), gpu.arg(&outs[2]));
            let (ca, sa) = (gpu.arg(&cb), gpu.arg(&sb));
            let kv_shape = [batch, seq, kv_heads, dim];
            launch_store_kv(&gpu.client, ka, va, ca, sa, to, kv_shape, F32);
            assert_eq!(q, gpu.read(&outs[0]), "{what}: queries");
            assert_eq!(keys, gpu.read(&kc2), "{what}: key cache");
            assert_eq!(vals, gpu.read(&vc2), "{what}: value cache");

            // Against f64: the products, the keys rotated, each at its sequence's positions.
            let a = rms_reference(&x, &gamma, rows, k);
            assert_close(
                &q,
                &product_reference(&a, &ws[0], rows, k, widths[0]),
                1e-4,
                &what,
            );
            let key_rows = product_reference(&a, &ws[1], rows, k, widths[1]);
            let value_rows = product_reference(&a, &ws[2], rows, k, widths[2]);
            for b in 0..batch {
                let key_f32: Vec<f32> = key_rows[b * seq * widths[1]..][..seq * widths[1]]
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                let rotated = rope_reference(&key_f32, &cos, &sin, [seq, kv_heads, dim]);
                for g in 0..kv_heads {
                    for p in 0..capacity {
                        for j in 0..dim {
                            let o = ((b * kv_heads + g) * capacity + p) * dim + j;
                            if !(at..at + seq).contains(&p) {
                                assert_eq!((keys[o], vals[o]), (held[o], held[o]), "{what}: kept");
                                continue;
                            }
                            let s = ((p - at) * kv_heads + g) * dim + j;
                            let v = value_rows[b * seq * widths[2] + s];
                            assert_close(&[keys[o]], &[rotated[s]], 1e-4, &what);
                            assert_close(&[vals[o]], &[v], 1e-4, &what);
                        }
                    }
                }
            }
        }
    }

    // Vectors of one column (odd widths): a cube's 32 columns cannot hold a head of 64.
    let widths = [249, 64, 64];
    let odd = [0, 1, 2].map(|i| gpu.zeros(&[k, widths[i]]));
    let xb = gpu.upload(&x[..k], &[1, k]);
    let (kc, vc, qb) = (
        gpu.zeros(&[1, 1, 4, 64]),
        gpu.zeros(&[1, 1, 4, 64]),
        gpu.zeros(&[1, 249]),
    );
    let tensors = FusedRows {
        x: gpu.arg(&xb),
        gamma: gpu.arg(&gb),
        residual: gpu.arg(&xb),
        weights: [gpu.arg(&odd[0]), gpu.arg(&odd[1]), gpu.arg(&odd[2])],
        outputs: [gpu.arg(&qb), gpu.arg(&qb), gpu.arg(&qb)],
    };
    let (cb, sb) = (gpu.zeros(&[1, 64]), gpu.zeros(&[1, 64]));
    let to = StoreAt {
        key_cache: gpu.arg(&kc),
        value_cache: gpu.arg(&vc),
        capacity: 4,
        at: 0,
    };
    let rope = [gpu.arg(&cb), gpu.arg(&sb)];
    assert!(!stores_whole_heads(&gpu.client, widths, F32, 64));
    let launched = launch_fused_qkv_store(
        &gpu.client,
        tensors,
        rope,
        to,
        [1, 1, k],
        64,
        widths,
        None,
        F32,
    );
    assert!(!launched, "a head split across cubes is refused");
}
