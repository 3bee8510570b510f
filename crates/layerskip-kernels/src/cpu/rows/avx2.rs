//! The AVX2/FMA kernels: two 8-lane vectors per panel of 16 columns.

use std::arch::x86_64::*;

use super::{MR, NR, Panels, Span};

/// How a kernel reads one feature's 16 weights of a panel as two f32 vectors.
trait Load {
    /// Bytes per unit.
    const UNIT: usize;
    /// Feature `i` of the panel whose first unit is at `panel`, each unit `stride` bytes
    /// after the one before.
    ///
    /// # Safety
    /// `panel` is an aligned panel of this kind with more than `i` features; the CPU has
    /// AVX2.
    unsafe fn load(panel: *const u8, i: usize, stride: usize, odd: bool) -> [__m256; 2];
}

/// [`super::Line`]: 16 f32.
struct F32;
impl Load for F32 {
    const UNIT: usize = 64;
    #[inline(always)]
    unsafe fn load(panel: *const u8, i: usize, stride: usize, _odd: bool) -> [__m256; 2] {
        // SAFETY: as promised by the caller.
        unsafe {
            let line = panel.add(i * stride) as *const f32;
            [_mm256_load_ps(line), _mm256_load_ps(line.add(8))]
        }
    }
}

/// [`super::HalfLine`]: 16 bfloat16, widened exactly (shifted into the upper half).
struct Bf16;
impl Load for Bf16 {
    const UNIT: usize = 32;
    #[inline(always)]
    unsafe fn load(panel: *const u8, i: usize, stride: usize, _odd: bool) -> [__m256; 2] {
        // SAFETY: as promised by the caller.
        unsafe {
            let line = panel.add(i * stride) as *const __m128i;
            let widen =
                |h: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            [
                widen(_mm_load_si128(line)),
                widen(_mm_load_si128(line.add(1))),
            ]
        }
    }
}

/// [`super::HalfPair`]s of tiled panels: the even panel's column `c` in the low half of 32-bit
/// word `c`, the odd panel's in its high half; a shift or a mask widens one panel's line.
struct Bf16Pairs;
impl Load for Bf16Pairs {
    const UNIT: usize = 32;
    #[inline(always)]
    unsafe fn load(panel: *const u8, i: usize, stride: usize, odd: bool) -> [__m256; 2] {
        // SAFETY: as promised by the caller (an odd panel's line is the second half of its
        // pair's 64 bytes).
        unsafe {
            let pair = panel.sub(usize::from(odd) * 32).add(i * stride) as *const __m256i;
            let widen = |v| {
                _mm256_castsi256_ps(if odd {
                    _mm256_and_si256(v, _mm256_set1_epi32(-65536))
                } else {
                    _mm256_slli_epi32::<16>(v)
                })
            };
            [
                widen(_mm256_load_si256(pair)),
                widen(_mm256_load_si256(pair.add(1))),
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
    unsafe { run_by_format!(x, w, out, rows, cols, p0, p1) }
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
    shape: super::Shape,
    out: *mut f32,
    rows: usize,
    cols: usize,
    p0: usize,
    p1: usize,
) {
    let (k, groups) = (shape.k, rows.div_ceil(MR));
    // SAFETY: every offset stays within the shapes promised by the caller.
    unsafe {
        let layout = (1, W::UNIT);
        let mut p = p0;
        while p < p1 {
            let (start, step, kt) = super::span(p, p1, shape, layout);
            let two = step >= 2;
            let a = lines.add(start * W::UNIT);
            let mut r = 0;
            for g in 0..groups {
                let size = rows / groups + usize::from(g < rows % groups);
                let (xr, or) = (x.as_ptr().add(r * k), out.add(r * cols));
                match (size, two) {
                    (1, true) => block::<W, 1, 2>(xr, a, or, kt, cols, p),
                    (2, true) => block::<W, 2, 2>(xr, a, or, kt, cols, p),
                    (1, false) => block::<W, 1, 1>(xr, a, or, kt, cols, p),
                    (2, false) => block::<W, 2, 1>(xr, a, or, kt, cols, p),
                    (3, _) => each::<W, 3>(xr, a, or, kt, cols, p, two),
                    (4, _) => each::<W, 4>(xr, a, or, kt, cols, p, two),
                    (5, _) => each::<W, 5>(xr, a, or, kt, cols, p, two),
                    _ => each::<W, MR>(xr, a, or, kt, cols, p, two),
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
    kt: Span,
    cols: usize,
    p: usize,
    two: bool,
) {
    // SAFETY: as promised by the caller.
    unsafe {
        block::<W, G, 1>(x, a, out, kt, cols, p);
        if two {
            block::<W, G, 1>(x, a.add(kt.next), out, kt, cols, p + 1);
        }
    }
}

/// `G` rows against the `P` panels from `p` (the first's units from `a`, laid out as
/// `span` says): `2 G P` chains.
///
/// # Safety
/// `x` holds `G` rows of `k`, `a` starts the units of `P` panels as `span` lays them out,
/// `out` `G` rows of `cols` with `p * NR < cols`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block<W: Load, const G: usize, const P: usize>(
    x: *const f32,
    a: *const u8,
    out: *mut f32,
    Span { k, next, stride }: Span,
    cols: usize,
    p: usize,
) {
    // SAFETY: as promised by the caller.
    unsafe {
        let mut acc = [[[_mm256_setzero_ps(); 2]; P]; G];
        for i in 0..k {
            super::prefetch(a, i, P, (next, stride), W::UNIT);
            let w: [[__m256; 2]; P] =
                std::array::from_fn(|j| W::load(a.add(j * next), i, stride, (p + j) % 2 == 1));
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
