//! Products over a few rows (decoding and self-speculative verification) on the Flex CPU
//! backend.
//!
//! Flex sends a one-row product to a matrix-vector path but 2-16 rows through gemm's packing
//! path, which on the default model's shapes costs 2.5-6x a single row: verifying `d + 1` drafts
//! in one pass then saved nothing. The kernels here stream each weight once for all rows, so four
//! rows cost about 1.7x one row and eight about 2.5x (8 layers of the default model, one core:
//! 1.8 / 2.2 / 3.2 / 4.6 ms for 1 / 2 / 4 / 8 rows, against gemm's 2.1 / 5.1 / 8.2 / 11.9).
//!
//! They also serve single rows, and every output is the same chain of fused multiply-adds over
//! the input features in order whatever the number of rows, so a row's result does not depend
//! on which other rows share the call: autoregressive decoding (one row) and self-speculative
//! verification (`d + 1` rows) compute bit-identical logits. Other backends, autodiff (training),
//! other dtypes and inputs of more than [`MAX_ROWS`] rows (prefill) keep Burn's matmul.

use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// Most rows the kernels take; longer inputs (prefill, evaluation, training) use Burn's matmul.
/// Self-speculation with `d` drafts verifies `d + 1` rows, so its logits are bit-identical to
/// autoregressive decoding's on Flex f32 for every `d < MAX_ROWS`.
pub const MAX_ROWS: usize = 32;

/// `x · W` for a bias-free [`Linear`] (`x` `[batch, seq, in]`, `W` `[in, out]`), through the row
/// kernel when it applies, else `Linear::forward`.
pub fn linear<B: Backend>(linear: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(feature = "flex")]
    if linear.bias.is_none()
        && let Some(out) = flex::try_rows::<B>(x.clone(), linear.weight.val(), flex::Layout::InOut)
    {
        return out;
    }
    linear.forward(x)
}

/// `x · W` for `x` `[batch, seq, in]` and any `W` `[in, out]` (a view is copied contiguous
/// first on Flex).
pub fn in_out<B: Backend>(x: Tensor<B, 3>, w: Tensor<B, 2>) -> Tensor<B, 3> {
    #[cfg(feature = "flex")]
    if let Some(out) = flex::try_rows::<B>(x.clone(), w.clone(), flex::Layout::InOut) {
        return out;
    }
    x.matmul(w.unsqueeze())
}

/// `x · Eᵀ` for a tied LM head (`x` `[batch, seq, hidden]`, `E` `[vocab, hidden]` in its stored
/// layout) -> `[batch, seq, vocab]`.
pub fn tied_head<B: Backend>(embed: Tensor<B, 2>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(feature = "flex")]
    if let Some(out) = flex::try_rows::<B>(x.clone(), embed.clone(), flex::Layout::OutIn) {
        return out;
    }
    // E · xᵀ keeps the embedding in its stored layout (multiplying by a transposed view of it
    // would copy the whole matrix).
    let [b, s, h] = x.dims();
    let logits = embed.matmul(x.reshape([b * s, h]).transpose()); // [vocab, b * s]
    let vocab = logits.dims()[0];
    logits.transpose().reshape([b, s, vocab])
}

#[cfg(feature = "flex")]
mod flex {
    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, Shape, Tensor};
    use burn_flex::FlexTensor;

    use super::MAX_ROWS;
    use crate::flex::{contiguous, is_flex, primitive, wrap};

    /// How the weight matrix is stored.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum Layout {
        /// `[in, out]`, Burn's `Linear` layout: outputs accumulate as axpys over weight rows.
        InOut,
        /// `[out, in]`, an embedding used as a tied head: each output is a dot product.
        OutIn,
    }

    /// The kernel's result when `B` is Flex, both tensors are f32 and `x` has at most
    /// [`MAX_ROWS`] rows; `None` otherwise.
    pub fn try_rows<B: Backend>(
        x: Tensor<B, 3>,
        w: Tensor<B, 2>,
        layout: Layout,
    ) -> Option<Tensor<B, 3>> {
        let [b, s, k] = x.dims();
        let [w0, w1] = w.dims();
        if !is_flex::<B>() || b * s > MAX_ROWS || x.dtype() != DType::F32 || w.dtype() != DType::F32
        {
            return None;
        }
        let n = if layout == Layout::InOut { w1 } else { w0 };
        let x = contiguous(primitive::<B, 3>(x));
        let w = contiguous(primitive::<B, 2>(w));
        let xs: &[f32] = &x.storage::<f32>()[x.layout().start_offset()..][..b * s * k];
        let ws: &[f32] = &w.storage::<f32>()[w.layout().start_offset()..][..k * n];
        let mut out = FlexTensor::empty(Shape::from(vec![b, s, n]), DType::F32);
        let os: &mut [f32] = out.storage_mut::<f32>();
        match layout {
            Layout::InOut => super::kernels::x_w(xs, ws, os, b * s, k, n),
            Layout::OutIn => super::kernels::x_wt(xs, ws, os, b * s, k, n),
        }
        Some(wrap::<B, 3>(out))
    }
}

/// The kernels on plain slices. Each output is `fma(x[k-1], w[k-1], ... fma(x[0], w[0], 0))`
/// (for `x_wt`, eight such chains over strided features summed pairwise, then the tail), the
/// same operations in the same order for any number of rows.
#[cfg(feature = "flex")]
pub(crate) mod kernels {
    /// Output columns per panel: the panel's accumulators for two rows (2 KiB) and four weight
    /// rows' slices (4 KiB) stay in L1.
    const PANEL: usize = 256;

    /// Features per block when several pairs of rows share a panel: 16 weight rows of a panel
    /// (16 KiB) stay in L1 while every pair uses them.
    const KBLOCK: usize = 16;

    /// Products of at least this many multiply-adds split their output columns over two
    /// threads (each output is still one thread's chain, so results do not change).
    const PARALLEL_WORK: usize = 1 << 17;

    /// A raw output pointer that two threads write through, on disjoint columns.
    #[derive(Clone, Copy)]
    struct Out(*mut f32);
    // SAFETY: the kernels write disjoint column ranges from each thread.
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}

    impl Out {
        /// The pointer (a method, so that closures capture the `Send` wrapper, not the field).
        fn ptr(self) -> *mut f32 {
            self.0
        }
    }

    /// Runs `f(c0, c1)` over the columns `0..n`, in two halves (split at a multiple of 8) on two
    /// threads when the product is large enough.
    fn split(rows: usize, k: usize, n: usize, f: impl Fn(usize, usize) + Sync) {
        let mid = n / 16 * 8;
        if rows >= 2 && rows * k * n >= PARALLEL_WORK && mid > 0 && rayon::current_num_threads() > 1
        {
            rayon::join(|| f(0, mid), || f(mid, n));
        } else {
            f(0, n);
        }
    }

    /// A kernel over the output columns `c0..c1`: `(x, w, out, rows, k, n, c0, c1)`.
    type Cols = unsafe fn(&[f32], &[f32], *mut f32, usize, usize, usize, usize, usize);

    /// Runs `fast` when there is one and the CPU has AVX2 and FMA, else `portable`, over the
    /// output columns (two threads for large products).
    #[allow(clippy::too_many_arguments)]
    fn run(
        x: &[f32],
        w: &[f32],
        out: &mut [f32],
        rows: usize,
        k: usize,
        n: usize,
        fast: Option<Cols>,
        portable: Cols,
    ) {
        assert!(x.len() >= rows * k && w.len() >= k * n && out.len() >= rows * n);
        #[cfg(target_arch = "x86_64")]
        let simd = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        let kernel = fast.filter(|_| simd).unwrap_or(portable);
        let o = Out(out.as_mut_ptr());
        // SAFETY: the shapes are asserted above, `kernel` runs on this CPU (checked above for
        // the SIMD one), and the calls write disjoint columns.
        split(rows, k, n, |c0, c1| unsafe {
            kernel(x, w, o.ptr(), rows, k, n, c0, c1)
        });
    }

    /// `out[r, :] = x[r, :] · w` with `x` `[rows, k]`, `w` `[k, n]`, `out` `[rows, n]`.
    pub fn x_w(x: &[f32], w: &[f32], out: &mut [f32], rows: usize, k: usize, n: usize) {
        #[cfg(target_arch = "x86_64")]
        let fast: Option<Cols> = Some(avx2::x_w);
        #[cfg(not(target_arch = "x86_64"))]
        let fast: Option<Cols> = None;
        run(x, w, out, rows, k, n, fast, portable::x_w_cols);
    }

    /// `out[r, v] = x[r, :] · w[v, :]` with `x` `[rows, k]`, `w` `[n, k]`, `out` `[rows, n]`.
    pub fn x_wt(x: &[f32], w: &[f32], out: &mut [f32], rows: usize, k: usize, n: usize) {
        #[cfg(target_arch = "x86_64")]
        let fast: Option<Cols> = Some(avx2::x_wt);
        #[cfg(not(target_arch = "x86_64"))]
        let fast: Option<Cols> = None;
        run(x, w, out, rows, k, n, fast, portable::x_wt_cols);
    }

    /// The reference order, in scalar code: what the SIMD kernels must reproduce bit for bit.
    pub mod portable {
        /// [`super::x_w`] for the columns `c0..c1` only.
        ///
        /// # Safety
        /// `out` holds `rows` rows of `n`; `x` and `w` hold their shapes; `c1 <= n`.
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn x_w_cols(
            x: &[f32],
            w: &[f32],
            out: *mut f32,
            rows: usize,
            k: usize,
            n: usize,
            c0: usize,
            c1: usize,
        ) {
            for r in 0..rows {
                for c in c0..c1 {
                    let mut acc = 0.0f32;
                    for i in 0..k {
                        acc = x[r * k + i].mul_add(w[i * n + c], acc);
                    }
                    // SAFETY: r < rows and c < n.
                    unsafe { *out.add(r * n + c) = acc };
                }
            }
        }

        /// [`super::x_wt`] for the columns (weight rows) `v0..v1` only.
        ///
        /// # Safety
        /// `out` holds `rows` rows of `n`; `x` and `w` hold their shapes; `v1 <= n`.
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn x_wt_cols(
            x: &[f32],
            w: &[f32],
            out: *mut f32,
            rows: usize,
            k: usize,
            n: usize,
            v0: usize,
            v1: usize,
        ) {
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                for v in v0..v1 {
                    // SAFETY: r < rows and v < n.
                    unsafe { *out.add(r * n + v) = dot(xr, &w[v * k..(v + 1) * k]) };
                }
            }
        }

        /// Eight lane sums over features `i ≡ lane (mod 8)`, summed pairwise, then the tail.
        pub fn dot(x: &[f32], w: &[f32]) -> f32 {
            let body = x.len() / 8 * 8;
            let mut lanes = [0.0f32; 8];
            for i in (0..body).step_by(8) {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    *lane = x[i + l].mul_add(w[i + l], *lane);
                }
            }
            let mut s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
                + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
            for i in body..x.len() {
                s = x[i].mul_add(w[i], s);
            }
            s
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        use super::{KBLOCK, PANEL, portable};

        /// Columns `c0..c1` (`c0` a multiple of 8) of `x · w`, rows two at a time, four weight
        /// rows applied per pass over a panel's accumulators. With more than two rows the
        /// features go in blocks of [`KBLOCK`]: a block's weight slices are read from memory
        /// once and reused by every pair of rows from L1, so the weights stream through the
        /// cache once whatever the number of rows.
        ///
        /// # Safety
        /// The CPU has AVX2 and FMA; `out` holds `rows` rows of `n`; `x`, `w` their shapes.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn x_w(
            x: &[f32],
            w: &[f32],
            out: *mut f32,
            rows: usize,
            k: usize,
            n: usize,
            c0: usize,
            c1: usize,
        ) {
            let body = (n / 8 * 8).min(c1);
            // SAFETY: every offset stays within the shapes promised by the caller.
            unsafe {
                for r in 0..rows {
                    std::ptr::write_bytes(out.add(r * n + c0), 0, c1 - c0);
                }
                // One group of rows runs through all features at once; with more groups, the
                // features go in blocks whose weight slices stay in L1 for every group.
                let block = if rows <= 2 { k } else { KBLOCK };
                let mut p0 = c0;
                while p0 < body {
                    let p1 = (p0 + PANEL).min(body);
                    let mut i0 = 0;
                    while i0 < k {
                        let i1 = (i0 + block).min(k);
                        let mut r = 0;
                        while r < rows {
                            let (xp, op) = (x.as_ptr().add(r * k), out.add(r * n));
                            if rows - r >= 2 {
                                panel::<2>(xp, w.as_ptr(), op, k, n, p0, p1, i0, i1);
                                r += 2;
                            } else {
                                panel::<1>(xp, w.as_ptr(), op, k, n, p0, p1, i0, i1);
                                r += 1;
                            }
                        }
                        i0 = i1;
                    }
                    p0 = p1;
                }
                // Columns past the last full vector: the same chains in scalar code.
                portable::x_w_cols(x, w, out, rows, k, n, body.max(c0), c1);
            }
        }

        /// Accumulates `G` rows' columns `p0..p1` (whole vectors) over the features `i0..i1`,
        /// four weight rows at a time, then one at a time.
        ///
        /// # Safety
        /// `x` holds `G` rows of `k`, `w` `k` rows of `n`, `out` `G` rows of `n`; `p1 <= n`,
        /// `i1 <= k`; the CPU has AVX2 and FMA.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn panel<const G: usize>(
            x: *const f32,
            w: *const f32,
            out: *mut f32,
            k: usize,
            n: usize,
            p0: usize,
            p1: usize,
            i0: usize,
            i1: usize,
        ) {
            // SAFETY: every offset stays within the shapes promised by the caller.
            unsafe {
                let mut i = i0;
                while i + 4 <= i1 {
                    let wi = w.add(i * n);
                    let mut a = [[_mm256_setzero_ps(); 4]; G];
                    for (g, ag) in a.iter_mut().enumerate() {
                        for (j, aj) in ag.iter_mut().enumerate() {
                            *aj = _mm256_broadcast_ss(&*x.add(g * k + i + j));
                        }
                    }
                    let mut c = p0;
                    while c < p1 {
                        let ws = [
                            _mm256_loadu_ps(wi.add(c)),
                            _mm256_loadu_ps(wi.add(n + c)),
                            _mm256_loadu_ps(wi.add(2 * n + c)),
                            _mm256_loadu_ps(wi.add(3 * n + c)),
                        ];
                        for (g, ag) in a.iter().enumerate() {
                            let o = out.add(g * n + c);
                            let mut acc = _mm256_loadu_ps(o);
                            for (aj, wj) in ag.iter().zip(ws) {
                                acc = _mm256_fmadd_ps(*aj, wj, acc);
                            }
                            _mm256_storeu_ps(o, acc);
                        }
                        c += 8;
                    }
                    i += 4;
                }
                while i < i1 {
                    let wi = w.add(i * n);
                    for g in 0..G {
                        let a = _mm256_broadcast_ss(&*x.add(g * k + i));
                        let mut c = p0;
                        while c < p1 {
                            let o = out.add(g * n + c);
                            let wv = _mm256_loadu_ps(wi.add(c));
                            _mm256_storeu_ps(o, _mm256_fmadd_ps(a, wv, _mm256_loadu_ps(o)));
                            c += 8;
                        }
                    }
                    i += 1;
                }
            }
        }

        /// Columns (vocabulary rows of `w`) `v0..v1` of `x · wᵀ`: two input rows at a time
        /// against four weight rows, eight lane accumulators per pair.
        ///
        /// # Safety
        /// As [`x_w`].
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn x_wt(
            x: &[f32],
            w: &[f32],
            out: *mut f32,
            rows: usize,
            k: usize,
            n: usize,
            v0: usize,
            v1: usize,
        ) {
            let quads = v0 + (v1 - v0) / 4 * 4;
            // SAFETY: rows < rows of x and out, weight rows < v1 <= n.
            unsafe {
                // Vocabulary rows outer, input rows inner: four weight rows (4 KiB at width
                // 256) are read once and used by every input row from L1.
                let mut v = v0;
                while v < quads {
                    let mut r = 0;
                    while r < rows {
                        let (xp, op) = (x.as_ptr().add(r * k), out.add(r * n));
                        if rows - r >= 2 {
                            dots::<2>(xp, w.as_ptr(), op, k, n, v);
                            r += 2;
                        } else {
                            dots::<1>(xp, w.as_ptr(), op, k, n, v);
                            r += 1;
                        }
                    }
                    v += 4;
                }
                for r in 0..rows {
                    let xr = &x[r * k..(r + 1) * k];
                    for v in quads..v1 {
                        *out.add(r * n + v) = portable::dot(xr, &w[v * k..(v + 1) * k]);
                    }
                }
            }
        }

        /// `out[g, v + j] = x[g] · w[v + j]` for `g < G`, `j < 4`, in `portable::dot`'s order.
        ///
        /// # Safety
        /// `x` holds `G` rows of `k`, `w` at least `v + 4` rows of `k`, `out` `G` rows of `n`;
        /// the CPU has AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn dots<const G: usize>(
            x: *const f32,
            w: *const f32,
            out: *mut f32,
            k: usize,
            n: usize,
            v: usize,
        ) {
            // SAFETY: every offset stays within the shapes promised by the caller.
            unsafe {
                let body = k / 8 * 8;
                let mut acc = [[_mm256_setzero_ps(); 4]; G];
                let mut i = 0;
                while i < body {
                    let ws = [
                        _mm256_loadu_ps(w.add(v * k + i)),
                        _mm256_loadu_ps(w.add((v + 1) * k + i)),
                        _mm256_loadu_ps(w.add((v + 2) * k + i)),
                        _mm256_loadu_ps(w.add((v + 3) * k + i)),
                    ];
                    for (g, accg) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(x.add(g * k + i));
                        for (a, wj) in accg.iter_mut().zip(ws) {
                            *a = _mm256_fmadd_ps(xv, wj, *a);
                        }
                    }
                    i += 8;
                }
                for (g, accg) in acc.iter().enumerate() {
                    for (j, a) in accg.iter().enumerate() {
                        let mut lanes = [0.0f32; 8];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                        let mut s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
                            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
                        for t in body..k {
                            s = (*x.add(g * k + t)).mul_add(*w.add((v + j) * k + t), s);
                        }
                        *out.add(g * n + v + j) = s;
                    }
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
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

        /// The dispatched (SIMD) kernels reproduce the scalar reference bit for bit, for every
        /// row count and for shapes with tails in both dimensions.
        #[test]
        fn simd_kernels_match_the_scalar_order_bit_for_bit() {
            for (k, n) in [(256, 768), (768, 256), (37, 11), (4, 1), (9, 300)] {
                let w = values(k * n, 1);
                for rows in 1..=5 {
                    let x = values(rows * k, 2 + rows as u64);
                    let (mut got, mut want) = (vec![0.0; rows * n], vec![0.0; rows * n]);
                    x_w(&x, &w, &mut got, rows, k, n);
                    // SAFETY: `want` holds rows x n, `x` and `w` their shapes.
                    unsafe { portable::x_w_cols(&x, &w, want.as_mut_ptr(), rows, k, n, 0, n) };
                    assert_eq!(got, want, "x_w k {k} n {n} rows {rows}");
                    x_wt(&x, &w, &mut got, rows, k, n);
                    // SAFETY: as above.
                    unsafe { portable::x_wt_cols(&x, &w, want.as_mut_ptr(), rows, k, n, 0, n) };
                    assert_eq!(got, want, "x_wt k {k} n {n} rows {rows}");
                }
            }
        }

        /// A row's result does not depend on the rows beside it: row `r` of a many-row call
        /// equals the one-row call on that row alone (what makes verification exact).
        #[test]
        fn a_row_is_computed_the_same_whatever_the_batch() {
            let (k, n) = (768, 256);
            let w = values(k * n, 7);
            let rows = 7;
            let x = values(rows * k, 8);
            let mut all = vec![0.0; rows * n];
            x_w(&x, &w, &mut all, rows, k, n);
            let mut all_t = vec![0.0; rows * n];
            x_wt(&x, &w, &mut all_t, rows, k, n);
            for r in 0..rows {
                let mut one = vec![0.0; n];
                x_w(&x[r * k..(r + 1) * k], &w, &mut one, 1, k, n);
                assert_eq!(&all[r * n..(r + 1) * n], &one[..], "x_w row {r}");
                x_wt(&x[r * k..(r + 1) * k], &w, &mut one, 1, k, n);
                assert_eq!(&all_t[r * n..(r + 1) * n], &one[..], "x_wt row {r}");
            }
        }

        /// Against an f64 product: the chains are accurate sums, not just self-consistent.
        #[test]
        fn kernels_compute_the_product() {
            let (rows, k, n) = (3, 300, 70);
            let (x, w) = (values(rows * k, 3), values(k * n, 4));
            let mut out = vec![0.0; rows * n];
            x_w(&x, &w, &mut out, rows, k, n);
            let mut out_t = vec![0.0; rows * n];
            // w read as [n, k] for the transposed kernel: the same numbers, another product.
            x_wt(&x, &w[..n * k], &mut out_t, rows, k, n);
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
    }
}
