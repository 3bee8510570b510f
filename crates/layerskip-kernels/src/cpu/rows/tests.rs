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
/// quantized blocks; tiles whole and partial (19 panels: four tiles and three panels).
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
    for format in [Quantization::Q8_0, Quantization::Q4_0] {
        layouts.push(Panels::quantized(&w, k, n, false, format).unwrap());
    }
    for panels in &layouts {
        let reference = dequantized(panels);
        for rows in [1, 2, 3, 7] {
            let x = values(rows * k, 40 + rows as u64);
            let want = portable::x_w(&x, &reference, rows, k, n);
            for kernel in Kernel::available() {
                for (p0, p1) in [(0, count), (1, 3), (2, 7), (3, 4), (5, count), (17, 19)] {
                    let mut out = vec![f32::NAN; rows * n];
                    // SAFETY: the shapes fit and the kernel runs on this CPU.
                    unsafe { (kernel.function())(&x, panels, out.as_mut_ptr(), rows, n, p0, p1) };
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

/// 4-bit panels: every kernel computes the f32 chains over `fma(q, d, m)` bit for bit, and
/// re-quantizing the dequantized weights gives them back (a Q4 file converted to f32 and
/// packed computes with the file's numbers).
#[test]
fn q4_panels_compute_the_dequantized_product_bit_for_bit() {
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
            let again = Panels::quantized(&deq, k, n, false, format).unwrap();
            assert_eq!(dequantized(&again), deq, "{format:?} re-quantized");
            for rows in [1, 2, 3, 7, 9] {
                let x = values(rows * k, 30 + rows as u64);
                let want = portable::x_w(&x, &deq, rows, k, n);
                assert_eq!(
                    run(&x, &q, rows, n),
                    want,
                    "{format:?} k {k} n {n} rows {rows}"
                );
                for kernel in Kernel::available() {
                    let got = with(kernel, &x, &q_t, rows, n);
                    assert_eq!(got, want, "{format:?} {kernel:?} {k} {n}");
                }
            }
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

/// Q8_0 panels: every kernel computes the f32 chains over the dequantized weights bit for
/// bit (the scale times a byte is exact in f32), from either layout; quantizing the
/// dequantized weights again gives the same panels (a Q8_0 file converted to f32 and packed
/// computes with the file's numbers); widths that are not whole blocks are refused.
#[test]
fn q8_0_panels_compute_the_dequantized_product_bit_for_bit() {
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
        let again = Panels::quantized(&deq, k, n, false, Quantization::Q8_0).unwrap();
        assert_eq!(dequantized(&again), deq, "re-quantized");
        for rows in [1, 2, 3, 7, 9] {
            let x = values(rows * k, 20 + rows as u64);
            let want = portable::x_w(&x, &deq, rows, k, n);
            assert_eq!(run(&x, &q, rows, n), want, "k {k} n {n} rows {rows}");
            for kernel in Kernel::available() {
                assert_eq!(with(kernel, &x, &q_t, rows, n), want, "{kernel:?} {k} {n}");
            }
        }
    }
    assert!(Panels::quantized(&values(40 * 16, 1), 40, 16, false, Quantization::Q8_0).is_none());
}

/// A row's result does not depend on the rows beside it: row `r` of a many-row call
/// equals the one-row call on that row alone (what makes verification exact).
#[test]
fn a_row_is_computed_the_same_whatever_the_batch() {
    let (k, n) = (768, 256);
    let w = Panels::from_in_out(&values(k * n, 7), k, n);
    for rows in [2, 5, 7, 12] {
        let x = values(rows * k, 8);
        let all = run(&x, &w, rows, n);
        for r in 0..rows {
            let one = run(&x[r * k..(r + 1) * k], &w, 1, n);
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
/// one-hot rows (`fma(1, w, 0) = w`), in each format; for f32 and bfloat16-valued panels of
/// an embedding `[n, k]` packed as a tied head, exactly its row `c`.
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
    let formats = [
        (Panels::from_out_in(&embedding, k, n), Some(&embedding)),
        (Panels::from_out_in(&bf16_valued, k, n), Some(&bf16_valued)),
        (
            Panels::quantized(&embedding, k, n, true, Quantization::Q8_0).unwrap(),
            None,
        ),
        (
            Panels::quantized(&embedding, k, n, true, Quantization::Q4_1).unwrap(),
            None,
        ),
    ];
    for (panels, exact) in &formats {
        let products = run(&one_hot, panels, k, n);
        for c in 0..n {
            let mut column = vec![f32::NAN; k];
            panels.column(c, &mut column);
            let read: Vec<f32> = (0..k).map(|i| products[i * n + c]).collect();
            assert_eq!(column, read, "column {c}");
            if let Some(w) = exact {
                assert_eq!(column, w[c * k..(c + 1) * k], "row {c}");
            }
        }
    }
}
