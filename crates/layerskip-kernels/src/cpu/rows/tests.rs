use super::*;

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// `w` `[k, n]` transposed to `[n, k]`.
fn transpose(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    (0..n * k).map(|j| w[(j % k) * n + j / k]).collect()
}

fn run(x: &[f32], w: &Panels, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; rows * cols];
    x_panels(x, w, &mut out, rows, cols);
    out
}

fn with(kernel: Kernel, x: &[f32], w: &Panels, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; rows * cols];
    x_panels_with(kernel, x, w, &mut out, rows, cols);
    out
}

/// Threads' shares of the panels cover them once, in order, starting on tile boundaries
/// (as evenly as those allow), for any thread count: more threads than tiles included.
#[test]
fn thread_shares_cover_the_panels_in_whole_tiles() {
    for tile in [1, TILE] {
        for count in [1, 2, 3, 5, 9, 19, 36, 3072] {
            for parts in 1..=count.min(16) {
                let starts: Vec<usize> = (0..=parts)
                    .map(|t| share_start(t, parts, count, tile))
                    .collect();
                assert_eq!((starts[0], starts[parts]), (0, count));
                for t in 0..parts {
                    let (a, b) = (starts[t], starts[t + 1]);
                    assert!(a <= b && b <= count, "{count} {parts} {tile}: {starts:?}");
                    assert!(
                        a % tile == 0 || a == count,
                        "{count} {parts} {tile}: {starts:?}"
                    );
                    let even = count / parts;
                    assert!(
                        b - a <= even + 2 * tile,
                        "{count} {parts} {tile}: {starts:?}"
                    );
                }
            }
        }
    }
}

/// Every kernel over any range of panels (as a thread's share of a product: starting or
/// ending inside a tile) reproduces the scalar chains, for every layout: f32 and bfloat16
/// lines one panel to a tile or [`TILE`] (whichever the chosen kernel packs for), and
/// quantized blocks (the integer kernels against [`int8::portable`]); tiles whole and partial
/// (19 panels: four tiles and three panels).
#[test]
fn every_layout_and_range_of_panels_matches_the_scalar_order() {
    let (k, n): (usize, usize) = (64, 300);
    let count = n.div_ceil(NR);
    let w = values(k * n, 5);
    let w16: Vec<f32> = w
        .iter()
        .map(|v| f32::from_bits(v.to_bits() & 0xffff_0000))
        .collect();
    let mut layouts = Vec::new();
    for tile in [1, 2, TILE] {
        layouts.push(Panels::build(k, n, false, Some(tile), |i, c| w[i * n + c]));
        layouts.push(Panels::build(k, n, true, Some(tile), |i, c| w16[i * n + c]));
    }
    for format in [Quantization::Q8_0, Quantization::Q4_0, Quantization::Q4_1] {
        layouts.push(Panels::quantized(&w, k, n, false, format).unwrap());
    }
    for panels in &layouts {
        let reference = dequantized(panels);
        for rows in [1, 2, 3, 5, 7, 9, 13] {
            let x = values(rows * k, 40 + rows as u64);
            let a = int8::Activations::quantize(&x, rows, k);
            let want = if panels.quantization().is_some() {
                let mut out = vec![f32::NAN; rows * n];
                // SAFETY: the shapes fit.
                unsafe { int8::portable(&a, panels, out.as_mut_ptr(), rows, n, 0, count) };
                out
            } else {
                portable::x_w(&x, &reference, rows, k, n)
            };
            for kernel in Kernel::available() {
                for (p0, p1) in [(0, count), (1, 3), (2, 7), (3, 4), (5, count), (17, 19)] {
                    let mut out = vec![f32::NAN; rows * n];
                    let o = out.as_mut_ptr();
                    // SAFETY: the shapes fit and the kernel runs on this CPU.
                    unsafe {
                        if panels.quantization().is_some() {
                            (kernel.int8_function())(&a, panels, o, rows, n, p0, p1)
                        } else {
                            (kernel.function())(&x, panels, o, rows, n, p0, p1)
                        }
                    };
                    for r in 0..rows {
                        let cols = p0 * NR..(p1 * NR).min(n);
                        assert_eq!(
                            &out[r * n..][cols.clone()],
                            &want[r * n..][cols],
                            "{kernel:?} tile {} bf16 {} {:?} rows {rows} panels {p0}..{p1}",
                            panels.tile,
                            panels.is_bf16(),
                            panels.quantization()
                        );
                    }
                }
            }
        }
    }
}

/// The dispatched (SIMD, threaded) kernel and every kernel this CPU runs (scalar, AVX2,
/// AVX-512) reproduce the scalar chains on the stored layout bit for bit, packed from either layout, in f32 or (for bfloat16 values) half
/// the bytes, for every row count (one group, several groups, a remainder) and for widths
/// with a partial last panel or a prefix of columns.
#[test]
fn simd_kernels_match_the_scalar_order_bit_for_bit() {
    let shapes = [
        (256, 768),
        (768, 256),
        (37, 11),
        (4, 1),
        (9, 300),
        (64, 4096),
    ];
    for ((k, n), bf16) in shapes.into_iter().flat_map(|s| [(s, false), (s, true)]) {
        let mut w = values(k * n, 1);
        if bf16 {
            // bfloat16 values: the panels keep them in half the bytes.
            w.iter_mut()
                .for_each(|v| *v = f32::from_bits(v.to_bits() & 0xffff_0000));
        }
        let want_layout = Panels::from_in_out(&w, k, n);
        let from_t = Panels::from_out_in(&transpose(&w, k, n), k, n);
        assert_eq!((want_layout.is_bf16(), from_t.is_bf16()), (bf16, bf16));
        for rows in [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17] {
            let x = values(rows * k, 2 + rows as u64);
            let want = portable::x_w(&x, &w, rows, k, n);
            for panels in [&want_layout, &from_t] {
                assert_eq!(run(&x, panels, rows, n), want, "k {k} n {n} rows {rows}");
                for kernel in Kernel::available() {
                    let got = with(kernel, &x, panels, rows, n);
                    assert_eq!(got, want, "{kernel:?} k {k} n {n} rows {rows}");
                }
            }
            for cols in [1, n / 2 + 3, n - 1]
                .into_iter()
                .filter(|&c| c >= 1 && c <= n)
            {
                let mut outputs = vec![run(&x, &want_layout, rows, cols)];
                for kernel in Kernel::available() {
                    outputs.push(with(kernel, &x, &want_layout, rows, cols));
                }
                for got in outputs {
                    for r in 0..rows {
                        assert_eq!(
                            &got[r * cols..(r + 1) * cols],
                            &want[r * n..r * n + cols],
                            "k {k} n {n} rows {rows} cols {cols}"
                        );
                    }
                }
            }
        }
    }
}

/// Q8_0 as ggml computes it, by hand: a block 0, 0.1, ..., 3.1 has amax 3.1, scale
/// 3.1 / 127 (0.024409..., stored as the nearest f16, 0.024414062), and weight 0.1 maps to
/// round(0.1 * 127 / 3.1) = round(4.0968) = 4, the largest to 127; an all-zero block to
/// scale 0.
#[test]
fn q8_0_quantizes_as_ggml() {
    let block: [f32; QK] = std::array::from_fn(|i| i as f32 * 0.1);
    let (d, q) = quantize_q8_0(&block);
    assert_eq!(d, 0.024414062);
    assert_eq!((q[0], q[1], q[10], q[31]), (0, 4, 41, 127));
    let negative: [f32; QK] = std::array::from_fn(|i| -(i as f32) * 0.1);
    assert_eq!(quantize_q8_0(&negative).1[31], -127);
    assert_eq!(quantize_q8_0(&[0.0; QK]), (0.0, [0; QK]));
}

/// Q4_0 and Q4_1 as ggml computes them, by hand.
#[test]
fn q4_quantizes_as_ggml() {
    // Q4_0: the largest magnitude is -4, so d = -4 / -8 = 0.5; 1.0 -> trunc(2 + 8.5) = 10,
    // -4 -> 0, 3.9 -> trunc(7.8 + 8.5) = 16, clamped to 15.
    let mut block = [0.0f32; QK];
    block[..3].copy_from_slice(&[1.0, -4.0, 3.9]);
    let (d, q) = quantize_q4_0(&block);
    assert_eq!((d, q[0], q[1], q[2], q[3]), (0.5, 10, 0, 15, 8));
    // Q4_1 of 0, 0.1, ..., 3.1: m = 0, d = 3.1 / 15 (f16: 0.20666504); 0.1 -> trunc(0.48 +
    // 0.5) = 0, 0.2 -> 1, 0.4 -> 2, 3.1 -> 15.
    let block: [f32; QK] = std::array::from_fn(|i| i as f32 * 0.1);
    let (d, m, q) = quantize_q4_1(&block);
    assert_eq!((d, m), (0.20666504, 0.0));
    assert_eq!((q[1], q[2], q[4], q[31]), (0, 1, 2, 15));
}

/// 4-bit panels hold ggml's values (`fma(q, d, m)`, within a step of the weights), from
/// either layout, and re-quantizing the dequantized weights gives them back (a Q4 file
/// converted to f32 and packed computes with the file's numbers); their products are the
/// integer formula's ([`quantized_product_in_f64`]).
#[test]
fn q4_panels_hold_the_formats_values() {
    for format in [Quantization::Q4_0, Quantization::Q4_1] {
        for (k, n) in [(64, 48), (256, 300), (96, 5)] {
            let w = values(k * n, 13);
            let q = Panels::quantized(&w, k, n, false, format).unwrap();
            let q_t = Panels::quantized(&transpose(&w, k, n), k, n, true, format).unwrap();
            assert_eq!(q.quantization(), Some(format));
            let deq = dequantized(&q);
            assert_eq!(dequantized(&q_t), deq);
            for (a, b) in w.iter().zip(&deq) {
                // At most a step (Q4_1: half of range / 15; Q4_0: amax / 8 where its top
                // nibble clamps), weights below 0.5 here, plus the f16 roundings.
                assert!((a - b).abs() <= 0.07, "{format:?} {a} vs {b}");
            }
            // Column 3's first block by ggml's quantizer directly, against the panels' nibbles.
            let column: [f32; QK] = std::array::from_fn(|i| w[i * n + 3]);
            let (d, m, nibbles) = match format {
                Quantization::Q4_0 => {
                    let (d, q) = quantize_q4_0(&column);
                    (d, -8.0 * d, q)
                }
                _ => quantize_q4_1(&column),
            };
            for (i, &nibble) in nibbles.iter().enumerate() {
                assert_eq!(
                    deq[i * n + 3],
                    f32::from(nibble).mul_add(d, m),
                    "{format:?} {i}"
                );
            }
            let again = Panels::quantized(&deq, k, n, false, format).unwrap();
            assert_eq!(dequantized(&again), deq, "{format:?} re-quantized");
            for rows in [1, 2, 3, 7, 9] {
                let x = values(rows * k, 30 + rows as u64);
                quantized_product_in_f64(&x, &q, rows, &deq);
                quantized_product_in_f64(&x, &q_t, rows, &deq);
            }
        }
    }
}

/// What every kernel computes with quantized panels `w` (the dispatched, threaded one and
/// each kernel this CPU runs, all the same bits as [`int8::portable`]), against the same sums
/// in f64: `x` quantized per block ([`int8::quantize_activations`]) times the format's values
/// `deq` (`[k, n]`), within f32's rounding of the block terms; and within the activations'
/// rounding (half a step per feature) of `x · deq` itself.
fn quantized_product_in_f64(x: &[f32], w: &Panels, rows: usize, deq: &[f32]) {
    let (k, n) = w.dims();
    let got = run(x, w, rows, n);
    let count = n.div_ceil(NR);
    let a = int8::Activations::quantize(x, rows, k);
    let mut reference = vec![f32::NAN; rows * n];
    // SAFETY: the shapes fit.
    unsafe { int8::portable(&a, w, reference.as_mut_ptr(), rows, n, 0, count) };
    assert_eq!(got, reference, "dispatched {k} {n} rows {rows}");
    for kernel in Kernel::available() {
        assert_eq!(
            with(kernel, x, w, rows, n),
            reference,
            "{kernel:?} {k} {n} rows {rows}"
        );
    }
    for r in 0..rows {
        let blocks: Vec<(f32, [i8; QK])> = (0..k / QK)
            .map(|b| int8::quantize_activations(x[r * k + b * QK..][..QK].try_into().unwrap()))
            .collect();
        for c in 0..n {
            let (mut exact, mut plain, mut step) = (0.0f64, 0.0f64, 0.0f64);
            for (b, (s, q)) in blocks.iter().enumerate() {
                for (t, &qi) in q.iter().enumerate() {
                    let i = b * QK + t;
                    let wi = f64::from(deq[i * n + c]);
                    exact += f64::from(*s) * f64::from(qi) * wi;
                    plain += f64::from(x[r * k + i]) * wi;
                    step += f64::from(*s) * 0.5 * wi.abs();
                }
            }
            let out = f64::from(got[r * n + c]);
            assert!((out - exact).abs() < 1e-5, "{r} {c}: {out} vs {exact}");
            assert!(
                (out - plain).abs() <= step + 1e-5,
                "{r} {c}: {out} vs {plain}"
            );
        }
    }
}

/// The weights a matrix's panels hold (for a quantized matrix, its dequantized weights),
/// `[k, n]`.
fn dequantized(w: &Panels) -> Vec<f32> {
    let (k, n) = (w.k, w.n);
    (0..k * n)
        .map(|e| w.weight(e % n / NR, e / n, e % n % NR))
        .collect()
}

/// Q8_0 panels hold ggml's values (`d * q`, within half a step of the weights), from either
/// layout; quantizing the dequantized weights again gives the same panels (a Q8_0 file
/// converted to f32 and packed computes with the file's numbers); their products are the
/// integer formula's ([`quantized_product_in_f64`]); widths that are not whole blocks are
/// refused.
#[test]
fn q8_0_panels_hold_the_formats_values() {
    for (k, n) in [(64, 48), (256, 300), (96, 5)] {
        let w = values(k * n, 11);
        let q = Panels::quantized(&w, k, n, false, Quantization::Q8_0).unwrap();
        let q_t = Panels::quantized(&transpose(&w, k, n), k, n, true, Quantization::Q8_0).unwrap();
        assert_eq!(q.quantization(), Some(Quantization::Q8_0));
        let deq = dequantized(&q);
        assert_eq!(dequantized(&q_t), deq);
        // The error: half a step (amax / 127, amax < 0.5 here) plus the scale's f16
        // rounding (2^-11 relative) over at most 127 steps.
        for (a, b) in w.iter().zip(&deq) {
            let bound = 0.5 * 0.5 / 127.0 + 0.5 / 2048.0;
            assert!((a - b).abs() <= bound, "{a} vs {b}");
        }
        let column: [f32; QK] = std::array::from_fn(|i| w[i * n + 2]);
        let (d, bytes) = quantize_q8_0(&column);
        for (i, &byte) in bytes.iter().enumerate() {
            assert_eq!(deq[i * n + 2], d * f32::from(byte), "{i}");
        }
        let again = Panels::quantized(&deq, k, n, false, Quantization::Q8_0).unwrap();
        assert_eq!(dequantized(&again), deq, "re-quantized");
        for rows in [1, 2, 3, 7, 9] {
            let x = values(rows * k, 20 + rows as u64);
            quantized_product_in_f64(&x, &q, rows, &deq);
            quantized_product_in_f64(&x, &q_t, rows, &deq);
        }
    }
    assert!(Panels::quantized(&values(40 * 16, 1), 40, 16, false, Quantization::Q8_0).is_none());
}

/// Activations as ggml's Q8_0 quantizes them, by hand, the scale kept in f32: a block 0,
/// 0.1, ..., 3.1 has scale 3.1 / 127, 0.1 maps to round(4.0968) = 4, 1.0 to round(40.968) =
/// 41, the largest to 127; a tie rounds to even (an amax of 127 makes the scale 1: 2.5 -> 2,
/// 3.5 -> 4, -0.5 -> 0); an all-zero block has scale 0.
#[test]
fn activations_quantize_as_ggml() {
    let block: [f32; QK] = std::array::from_fn(|i| i as f32 * 0.1);
    let (d, q) = int8::quantize_activations(&block);
    assert_eq!(d, block[31] / 127.0);
    assert_eq!((q[0], q[1], q[10], q[31]), (0, 4, 41, 127));
    let mut ties = [0.0f32; QK];
    ties[..4].copy_from_slice(&[127.0, 2.5, 3.5, -0.5]);
    let (d, q) = int8::quantize_activations(&ties);
    assert_eq!((d, q[0], q[1], q[2], q[3]), (1.0, 127, 2, 4, 0));
    assert_eq!(int8::quantize_activations(&[0.0; QK]), (0.0, [0; QK]));
    let a = int8::Activations::quantize(&block.map(|v| -v), 1, QK);
    assert_eq!((a.q[31], a.sum[0]), (-127, -q_sum(&block)));
}

/// The sum of a block's bytes as [`int8::quantize_activations`] makes them.
fn q_sum(block: &[f32; QK]) -> i32 {
    int8::quantize_activations(block)
        .1
        .iter()
        .map(|&v| i32::from(v))
        .sum()
}

/// A row's result does not depend on the rows beside it: row `r` of a many-row call
/// equals the one-row call on that row alone (what makes verification exact).
#[test]
fn a_row_is_computed_the_same_whatever_the_batch() {
    let (k, n) = (768, 256);
    let values_w = values(k * n, 7);
    let mut layouts = vec![Panels::from_in_out(&values_w, k, n)];
    for format in [Quantization::Q8_0, Quantization::Q4_0, Quantization::Q4_1] {
        layouts.push(Panels::quantized(&values_w, k, n, false, format).unwrap());
    }
    for (w, rows) in layouts.iter().flat_map(|w| [2, 5, 7, 12].map(|r| (w, r))) {
        let x = values(rows * k, 8);
        let all = run(&x, w, rows, n);
        for r in 0..rows {
            let one = run(&x[r * k..(r + 1) * k], w, 1, n);
            assert_eq!(&all[r * n..(r + 1) * n], &one[..], "{rows} rows, row {r}");
        }
    }
}

/// Against an f64 product: the chains are accurate sums, not just self-consistent.
#[test]
fn kernels_compute_the_product() {
    let (rows, k, n) = (3, 300, 70);
    let (x, w) = (values(rows * k, 3), values(k * n, 4));
    let out = run(&x, &Panels::from_in_out(&w, k, n), rows, n);
    // The same numbers read as an embedding `[n, k]`: another product.
    let out_t = run(&x, &Panels::from_out_in(&w, k, n), rows, n);
    for r in 0..rows {
        for c in 0..n {
            let exact: f64 = (0..k)
                .map(|i| x[r * k + i] as f64 * w[i * n + c] as f64)
                .sum();
            assert!((out[r * n + c] as f64 - exact).abs() < 1e-4, "x_w {r} {c}");
            let exact_t: f64 = (0..k)
                .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                .sum();
            assert!(
                (out_t[r * n + c] as f64 - exact_t).abs() < 1e-4,
                "x_wt {r} {c}"
            );
        }
    }
}

/// `column(c)` is output `c`'s weights as every product reads them: the product of the `k`
/// one-hot rows (`fma(1, w, 0) = w`) for f32 and bfloat16-valued panels of an embedding
/// `[n, k]` packed as a tied head, exactly its row `c`; for quantized panels, the values of
/// ggml's quantizer run on row `c`, which the one-hot rows' products (quantized to 127 with
/// scale 1/127) give back to within a rounding.
#[test]
fn a_column_is_what_the_products_read() {
    let (k, n) = (64, 37);
    let embedding = values(n * k, 11);
    let bf16_valued: Vec<f32> = embedding
        .iter()
        .map(|v| f32::from_bits(v.to_bits() & 0xffff_0000))
        .collect();
    let one_hot: Vec<f32> = (0..k * k)
        .map(|e| if e / k == e % k { 1.0 } else { 0.0 })
        .collect();
    let plain = [
        (Panels::from_out_in(&embedding, k, n), &embedding),
        (Panels::from_out_in(&bf16_valued, k, n), &bf16_valued),
    ];
    for (panels, w) in &plain {
        let products = run(&one_hot, panels, k, n);
        for c in 0..n {
            let mut column = vec![f32::NAN; k];
            panels.column(c, &mut column);
            let read: Vec<f32> = (0..k).map(|i| products[i * n + c]).collect();
            assert_eq!(column, read, "column {c}");
            assert_eq!(column, w[c * k..(c + 1) * k], "row {c}");
        }
    }
    for format in [Quantization::Q8_0, Quantization::Q4_1] {
        let panels = Panels::quantized(&embedding, k, n, true, format).unwrap();
        let products = run(&one_hot, &panels, k, n);
        for c in 0..n {
            let mut column = vec![f32::NAN; k];
            panels.column(c, &mut column);
            for b in 0..k / QK {
                let row: [f32; QK] = embedding[c * k + b * QK..][..QK].try_into().unwrap();
                let want: Vec<f32> = if format == Quantization::Q8_0 {
                    let (d, q) = quantize_q8_0(&row);
                    q.iter().map(|&v| d * f32::from(v)).collect()
                } else {
                    let (d, m, q) = quantize_q4_1(&row);
                    q.iter().map(|&v| f32::from(v).mul_add(d, m)).collect()
                };
                assert_eq!(column[b * QK..(b + 1) * QK], want[..], "{format} {c} {b}");
            }
            for (i, v) in column.iter().enumerate() {
                let read = products[i * n + c];
                assert!((read - v).abs() <= 1e-6, "{format} {c} {i}: {read} vs {v}");
            }
        }
    }
}
