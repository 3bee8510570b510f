//! Products of a few rows with a weight matrix read from a packed copy ([`Panels`]: panels of
//! [`NR`] output columns, each panel's input features in order, so that a panel streams
//! contiguously; weights that are all bfloat16 values in half the bytes), with up to six rows'
//! accumulators in registers while a panel streams once.
//!
//! Each output is `fma(x[k-1], w[k-1], ... fma(x[0], w[0], 0))`, the same operations in the same
//! order for any number of rows, so a row's result does not depend on which other rows share
//! the call. [`portable`] is that order in scalar code; the AVX2 kernels reproduce it bit for
//! bit.

/// Output columns per panel: two AVX2 vectors, one 64-byte cache line per feature.
pub const NR: usize = 16;

/// Most rows whose accumulators stay in registers together (6 rows x 2 vectors + 2 weight
/// vectors + 1 broadcast = 15 of the 16 AVX2 registers).
const MR: usize = 6;

/// Products of at least this many multiply-adds and more than [`MR`] rows split their panels
/// over two threads (each output is still one thread's chain, so results do not change).
/// With fewer rows a product is bound by the weights' trip from memory, which a second
/// thread on this kind of 2-vCPU machine does not speed up, while waking it costs: 2 and 4
/// rows of the default model's 8 layers took 1.2-1.4 and 1.7 ms on two threads against
/// 0.8-0.9 and 1.1 ms on one.
const PARALLEL_WORK: usize = 1 << 17;

/// One feature's weights for one panel's 16 output columns, on its own cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Line(pub [f32; NR]);

/// [`Line`] for weights that are exact in bfloat16: the upper 16 bits of each f32, half a
/// cache line.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct HalfLine(pub [u16; NR]);

/// The lines of a [`Panels`].
enum Lines {
    F32(Vec<Line>),
    /// Every weight is a bfloat16 value (a checkpoint stored in bf16, computed in f32): the
    /// same numbers in half the bytes, so the kernels' products do not change.
    Bf16(Vec<HalfLine>),
}

/// A weight matrix with `k` input features and `n` outputs, in panels of [`NR`] output
/// columns: line `p * k + i` holds feature `i`'s weights for outputs `p * NR..`, zero past
/// `n` in the last panel.
pub struct Panels {
    lines: Lines,
    k: usize,
    n: usize,
}

impl Panels {
    fn build(k: usize, n: usize, bf16: bool, weight: impl Fn(usize, usize) -> f32) -> Self {
        let count = n.div_ceil(NR);
        let fill = |set: &mut dyn FnMut(usize, usize, f32)| {
            for p in 0..count {
                for i in 0..k {
                    for j in 0..NR.min(n - p * NR) {
                        set(p * k + i, j, weight(i, p * NR + j));
                    }
                }
            }
        };
        let lines = if bf16 {
            let mut lines = vec![HalfLine([0; NR]); count * k];
            fill(&mut |l, j, v| lines[l].0[j] = (v.to_bits() >> 16) as u16);
            Lines::Bf16(lines)
        } else {
            let mut lines = vec![Line([0.0; NR]); count * k];
            fill(&mut |l, j, v| lines[l].0[j] = v);
            Lines::F32(lines)
        };
        Self { lines, k, n }
    }

    /// From `w` `[k, n]` (Burn's `Linear` layout).
    pub fn from_in_out(w: &[f32], k: usize, n: usize) -> Self {
        Self::build(k, n, exact_in_bf16(w), |i, c| w[i * n + c])
    }

    /// From `w` `[n, k]` (an embedding read as a tied head).
    pub fn from_out_in(w: &[f32], k: usize, n: usize) -> Self {
        Self::build(k, n, exact_in_bf16(w), |i, c| w[c * k + i])
    }

    /// Whether the lines hold bfloat16 values.
    pub fn is_bf16(&self) -> bool {
        matches!(self.lines, Lines::Bf16(_))
    }

    /// Weight of feature `i` for output `p * NR + j`.
    fn weight(&self, p: usize, i: usize, j: usize) -> f32 {
        match &self.lines {
            Lines::F32(lines) => lines[p * self.k + i].0[j],
            Lines::Bf16(lines) => f32::from_bits(u32::from(lines[p * self.k + i].0[j]) << 16),
        }
    }

    fn count(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// Whether every value is a bfloat16 value (its low 16 bits zero).
fn exact_in_bf16(w: &[f32]) -> bool {
    w.iter().all(|v| v.to_bits() & 0xffff == 0)
}

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

/// A kernel over the panels `p0..p1`: `(x, w, out, rows, cols, p0, p1)`.
type PanelRange = unsafe fn(&[f32], &Panels, *mut f32, usize, usize, usize, usize);

/// `out[r, c] = x[r, :] · w[:, c]` for the first `cols` outputs, `x` `[rows, k]`, `out`
/// `[rows, cols]`; AVX2 and FMA when the CPU has them, and two threads for large products.
pub fn x_panels(x: &[f32], w: &Panels, out: &mut [f32], rows: usize, cols: usize) {
    assert!(cols <= w.n && x.len() >= rows * w.k && out.len() >= rows * cols);
    #[cfg(target_arch = "x86_64")]
    let kernel: PanelRange = if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        avx2::panels
    } else {
        portable::panels
    };
    #[cfg(not(target_arch = "x86_64"))]
    let kernel: PanelRange = portable::panels;
    let count = cols.div_ceil(NR);
    let o = Out(out.as_mut_ptr());
    // SAFETY: the shapes are asserted above, `kernel` runs on this CPU (checked above for
    // the SIMD one), and the two calls write disjoint panels.
    let run = |p0: usize, p1: usize| unsafe { kernel(x, w, o.ptr(), rows, cols, p0, p1) };
    let mid = count / 2;
    if rows > MR
        && rows * w.k * cols >= PARALLEL_WORK
        && mid > 0
        && rayon::current_num_threads() > 1
    {
        rayon::join(|| run(0, mid), || run(mid, count));
    } else {
        run(0, count);
    }
    debug_assert!(w.count() >= count);
}

/// The reference order, in scalar code: what the SIMD kernels must reproduce bit for bit.
pub mod portable {
    use super::{NR, Panels};

    /// [`super::x_panels`] over the panels `p0..p1`, in scalar code.
    ///
    /// # Safety
    /// `out` holds `rows` rows of `cols`; `x` holds `rows` rows of `w.k`; `p1 * NR` does
    /// not pass `cols` by a whole panel.
    pub unsafe fn panels(
        x: &[f32],
        w: &Panels,
        out: *mut f32,
        rows: usize,
        cols: usize,
        p0: usize,
        p1: usize,
    ) {
        let k = w.k;
        for r in 0..rows {
            for p in p0..p1 {
                for j in 0..NR.min(cols - p * NR) {
                    let mut acc = 0.0f32;
                    for i in 0..k {
                        acc = x[r * k + i].mul_add(w.weight(p, i, j), acc);
                    }
                    // SAFETY: r < rows and p * NR + j < cols.
                    unsafe { *out.add(r * cols + p * NR + j) = acc };
                }
            }
        }
    }

    /// `x · w` for `w` `[k, n]` in its stored layout: the chains of [`panels`], for tests.
    #[cfg(test)]
    pub fn x_w(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let mut acc = 0.0f32;
                for i in 0..k {
                    acc = x[r * k + i].mul_add(w[i * n + c], acc);
                }
                out[r * n + c] = acc;
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{MR, NR, Panels};

    /// Bytes ahead of the line in use that the kernel asks the cache to fetch (32 f32
    /// lines): the hardware prefetcher alone falls behind when several rows share each line.
    const PREFETCH: usize = 2048;

    /// How a kernel reads one line of 16 weights as two f32 vectors.
    trait Load {
        /// Bytes per line.
        const BYTES: usize;
        /// # Safety
        /// `line` is a line of this kind, aligned; the CPU has AVX2.
        unsafe fn load(line: *const u8) -> [__m256; 2];
    }

    /// [`super::Line`]: 16 f32.
    struct F32;
    impl Load for F32 {
        const BYTES: usize = 64;
        #[inline(always)]
        unsafe fn load(line: *const u8) -> [__m256; 2] {
            let line = line as *const f32;
            // SAFETY: as promised by the caller.
            unsafe { [_mm256_load_ps(line), _mm256_load_ps(line.add(8))] }
        }
    }

    /// [`super::HalfLine`]: 16 bfloat16, widened exactly (shifted into the upper half).
    struct Bf16;
    impl Load for Bf16 {
        const BYTES: usize = 32;
        #[inline(always)]
        unsafe fn load(line: *const u8) -> [__m256; 2] {
            let line = line as *const __m128i;
            // SAFETY: as promised by the caller.
            unsafe {
                let widen = |h: __m128i| {
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                };
                [
                    widen(_mm_load_si128(line)),
                    widen(_mm_load_si128(line.add(1))),
                ]
            }
        }
    }

    /// The panels `p0..p1` of `x · w`. The rows go in groups of at most [`MR`], as even as
    /// possible (7 rows: 4 + 3), each group's accumulators in registers while a panel's
    /// lines stream; groups of one or two rows take two panels at once, so that at least
    /// eight independent chains hide the FMA latency (three rows over two panels do not fit
    /// the 16 registers: the default model's 3-row pass took 1.4 ms that way, 0.96 ms one
    /// panel at a time). Panels go in pairs, every group using a pair before the next (from
    /// L1/L2 after the first group).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; as [`super::portable::panels`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panels(
        x: &[f32],
        w: &Panels,
        out: *mut f32,
        rows: usize,
        cols: usize,
        p0: usize,
        p1: usize,
    ) {
        // SAFETY: as promised by the caller.
        unsafe {
            match &w.lines {
                super::Lines::F32(l) => {
                    run::<F32>(x, l.as_ptr() as *const u8, w.k, out, rows, cols, p0, p1)
                }
                super::Lines::Bf16(l) => {
                    run::<Bf16>(x, l.as_ptr() as *const u8, w.k, out, rows, cols, p0, p1)
                }
            }
        }
    }

    /// [`panels`] over lines of kind `W` from `lines`.
    ///
    /// # Safety
    /// As [`panels`], `lines` holding the panels' lines.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<W: Load>(
        x: &[f32],
        lines: *const u8,
        k: usize,
        out: *mut f32,
        rows: usize,
        cols: usize,
        p0: usize,
        p1: usize,
    ) {
        let groups = rows.div_ceil(MR);
        // SAFETY: every offset stays within the shapes promised by the caller.
        unsafe {
            let mut p = p0;
            while p < p1 {
                let two = p + 2 <= p1;
                let a = lines.add(p * k * W::BYTES);
                let mut r = 0;
                for g in 0..groups {
                    let size = rows / groups + usize::from(g < rows % groups);
                    let (xr, or) = (x.as_ptr().add(r * k), out.add(r * cols));
                    match (size, two) {
                        (1, true) => block::<W, 1, 2>(xr, a, or, k, cols, p),
                        (2, true) => block::<W, 2, 2>(xr, a, or, k, cols, p),
                        (1, false) => block::<W, 1, 1>(xr, a, or, k, cols, p),
                        (2, false) => block::<W, 2, 1>(xr, a, or, k, cols, p),
                        (3, _) => each::<W, 3>(xr, a, or, k, cols, p, two),
                        (4, _) => each::<W, 4>(xr, a, or, k, cols, p, two),
                        (5, _) => each::<W, 5>(xr, a, or, k, cols, p, two),
                        _ => each::<W, MR>(xr, a, or, k, cols, p, two),
                    }
                    r += size;
                }
                p += if two { 2 } else { 1 };
            }
        }
    }

    /// `G` rows against panel `p`, and panel `p + 1` too when `two`, one at a time.
    ///
    /// # Safety
    /// As [`block`] (for two panels when `two`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn each<W: Load, const G: usize>(
        x: *const f32,
        a: *const u8,
        out: *mut f32,
        k: usize,
        cols: usize,
        p: usize,
        two: bool,
    ) {
        // SAFETY: as promised by the caller.
        unsafe {
            block::<W, G, 1>(x, a, out, k, cols, p);
            if two {
                block::<W, G, 1>(x, a.add(k * W::BYTES), out, k, cols, p + 1);
            }
        }
    }

    /// `G` rows against the `P` panels from `p` (their lines from `a`): `2 G P` chains.
    ///
    /// # Safety
    /// `x` holds `G` rows of `k`, `a` `P * k` lines, `out` `G` rows of `cols` with
    /// `p * NR < cols`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<W: Load, const G: usize, const P: usize>(
        x: *const f32,
        a: *const u8,
        out: *mut f32,
        k: usize,
        cols: usize,
        p: usize,
    ) {
        // SAFETY: as promised by the caller.
        unsafe {
            let mut acc = [[[_mm256_setzero_ps(); 2]; P]; G];
            for i in 0..k {
                let mut w = [[_mm256_setzero_ps(); 2]; P];
                for (j, wj) in w.iter_mut().enumerate() {
                    let line = a.add((j * k + i) * W::BYTES);
                    // A hint only: past the end of the lines it reads nothing.
                    _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(PREFETCH) as *const i8);
                    *wj = W::load(line);
                }
                for (g, accg) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*x.add(g * k + i));
                    for (accj, wj) in accg.iter_mut().zip(&w) {
                        accj[0] = _mm256_fmadd_ps(xv, wj[0], accj[0]);
                        accj[1] = _mm256_fmadd_ps(xv, wj[1], accj[1]);
                    }
                }
            }
            // `j` picks the panel inside each row's accumulators.
            #[allow(clippy::needless_range_loop)]
            for j in 0..P {
                let c = (p + j) * NR;
                if c < cols {
                    let rows: [[__m256; 2]; G] = std::array::from_fn(|g| acc[g][j]);
                    store::<G>(&rows, out, cols, c);
                }
            }
        }
    }

    /// Writes `G` rows' accumulators to the columns `c..c + 16` of `out`, cut at `cols`.
    ///
    /// # Safety
    /// `out` holds `G` rows of `cols`, `c < cols`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store<const G: usize>(acc: &[[__m256; 2]; G], out: *mut f32, cols: usize, c: usize) {
        // SAFETY: as promised by the caller; partial panels go through a buffer.
        unsafe {
            for (g, accg) in acc.iter().enumerate() {
                let o = out.add(g * cols + c);
                if c + NR <= cols {
                    _mm256_storeu_ps(o, accg[0]);
                    _mm256_storeu_ps(o.add(8), accg[1]);
                } else {
                    let mut buf = [0.0f32; NR];
                    _mm256_storeu_ps(buf.as_mut_ptr(), accg[0]);
                    _mm256_storeu_ps(buf.as_mut_ptr().add(8), accg[1]);
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), o, cols - c);
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

    /// `w` `[k, n]` transposed to `[n, k]`.
    fn transpose(w: &[f32], k: usize, n: usize) -> Vec<f32> {
        (0..n * k).map(|j| w[(j % k) * n + j / k]).collect()
    }

    fn run(x: &[f32], w: &Panels, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; rows * cols];
        x_panels(x, w, &mut out, rows, cols);
        out
    }

    fn scalar(x: &[f32], w: &Panels, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; rows * cols];
        // SAFETY: `out` holds rows x cols, `x` rows x k; the panels cover `cols`.
        unsafe { portable::panels(x, w, out.as_mut_ptr(), rows, cols, 0, cols.div_ceil(NR)) };
        out
    }

    /// The dispatched (SIMD, threaded) kernel reproduces the scalar chains on the stored
    /// layout bit for bit, packed from either layout, in f32 or (for bfloat16 values) half
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
            for rows in [1, 2, 3, 4, 5, 6, 7, 9, 13] {
                let x = values(rows * k, 2 + rows as u64);
                let want = portable::x_w(&x, &w, rows, k, n);
                for panels in [&want_layout, &from_t] {
                    assert_eq!(run(&x, panels, rows, n), want, "k {k} n {n} rows {rows}");
                    assert_eq!(scalar(&x, panels, rows, n), want, "scalar k {k} n {n}");
                }
                for cols in [1, n / 2 + 3, n - 1]
                    .into_iter()
                    .filter(|&c| c >= 1 && c <= n)
                {
                    let got = run(&x, &want_layout, rows, cols);
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
}
