//! The AVX-512 VNNI kernel: one `vpdpbusd` multiplies four features of a panel's 16 columns by
//! four bytes of a row and adds them into 16 32-bit sums.

use std::arch::x86_64::*;

use super::super::{Lines, NR, Panels, QK, Shape, Span, passes};
use super::Activations;

/// How the kernel reads a block of one panel: its groups of four features as unsigned bytes
/// (a 32-bit lane per column), two groups per read.
trait Format {
    /// Bytes per block.
    const UNIT: usize;
    /// Q8_0 (`t = d S`; its signed bytes read as unsigned, `S` corrected by `128 X`).
    const Q8: bool;
    /// Read `l` (0..4) of the block at `block`: two groups of four features, and where their
    /// features start in the block.
    ///
    /// # Safety
    /// `block` is an aligned block of this format; the CPU has AVX-512BW.
    unsafe fn groups(block: *const u8, l: usize) -> ([__m512i; 2], [usize; 2]);
    /// The block's scales `d` and offsets `m` (Q8_0: `m` unused).
    ///
    /// # Safety
    /// As [`Format::groups`].
    unsafe fn scales(block: *const u8) -> (__m512, __m512);
}

/// [`super::super::Q8Block`]: signed bytes, read as unsigned by flipping the sign bit (`q + 128`).
struct Q8;
impl Format for Q8 {
    const UNIT: usize = std::mem::size_of::<super::super::Q8Block>();
    const Q8: bool = true;
    #[inline(always)]
    unsafe fn groups(block: *const u8, l: usize) -> ([__m512i; 2], [usize; 2]) {
        // SAFETY: as promised by the caller.
        unsafe {
            let flip = _mm512_set1_epi8(-128);
            let at = |h: usize| {
                let v = _mm512_load_si512(block.add(64 + h * 64) as *const __m512i);
                _mm512_xor_si512(v, flip)
            };
            ([at(2 * l), at(2 * l + 1)], [8 * l, 8 * l + 4])
        }
    }
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> (__m512, __m512) {
        // SAFETY: as promised by the caller.
        unsafe { (_mm512_load_ps(block as *const f32), _mm512_setzero_ps()) }
    }
}

/// [`super::super::Q4Block`]: nibbles, features `4l..` in the low halves and `16 + 4l..` in the
/// high halves of read `l`; scales and offsets in f16.
struct Q4;
impl Format for Q4 {
    const UNIT: usize = std::mem::size_of::<super::super::Q4Block>();
    const Q8: bool = false;
    #[inline(always)]
    unsafe fn groups(block: *const u8, l: usize) -> ([__m512i; 2], [usize; 2]) {
        // SAFETY: as promised by the caller.
        unsafe {
            let v = _mm512_load_si512(block.add(64 + l * 64) as *const __m512i);
            let low = _mm512_set1_epi8(0x0f);
            let lo = _mm512_and_si512(v, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            ([lo, hi], [4 * l, 16 + 4 * l])
        }
    }
    #[inline(always)]
    unsafe fn scales(block: *const u8) -> (__m512, __m512) {
        // SAFETY: as promised by the caller.
        unsafe {
            let f16s =
                |at: usize| _mm512_cvtph_ps(_mm256_load_si256(block.add(at) as *const __m256i));
            (f16s(0), f16s(32))
        }
    }
}

/// Bytes ahead of the block in use that the kernel asks the cache for in a tile's stream.
const PREFETCH: usize = 4096;

/// The panels `p0..p1` of `x · w` for quantized `w`: rows in groups of at most eight, a tile's
/// four panels at once for one or two rows, two for up to four, one beyond.
///
/// # Safety
/// The CPU has AVX-512F, BW and VNNI; as [`super::portable`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn panels(
    x: &Activations,
    w: &Panels,
    out: *mut f32,
    rows: usize,
    cols: usize,
    p0: usize,
    p1: usize,
) {
    let shape = w.shape();
    // SAFETY: as promised by the caller.
    unsafe {
        match &w.lines {
            Lines::Q8(l) => run::<Q8>(x, l.as_ptr().cast(), shape, out, rows, cols, (p0, p1)),
            Lines::Q4(l, _) => run::<Q4>(x, l.as_ptr().cast(), shape, out, rows, cols, (p0, p1)),
            _ => unreachable!("integer products need quantized panels"),
        }
    }
}

/// [`panels`] over blocks of format `F` from `blocks`.
///
/// # Safety
/// As [`panels`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn run<F: Format>(
    x: &Activations,
    blocks: *const u8,
    shape: Shape,
    out: *mut f32,
    rows: usize,
    cols: usize,
    (p0, p1): (usize, usize),
) {
    const MR: usize = 8;
    let k = shape.k;
    let wide = |size: usize| match size {
        1 | 2 => 4,
        3 | 4 => 2,
        _ => 1,
    };
    passes(shape, (QK, F::UNIT), (rows, MR), (p0, p1), wide, |pass| {
        // SAFETY: every offset stays within the shapes promised by the caller.
        unsafe {
            let rows_at = Rows {
                q: x.q.as_ptr().add(pass.r * k),
                scale: x.scale.as_ptr().add(pass.r * k / QK),
                sum: x.sum.as_ptr().add(pass.r * k / QK),
            };
            let (a, or) = (blocks.add(pass.offset), out.add(pass.r * cols));
            group::<F>(
                pass.size, pass.take, rows_at, a, or, pass.span, cols, pass.p,
            );
        }
    });
}

/// A group's rows of [`Activations`]: bytes `[G, k]`, block scales and sums `[G, k / QK]`.
#[derive(Clone, Copy)]
struct Rows {
    q: *const i8,
    scale: *const f32,
    sum: *const i32,
}

/// `block::<F, size, panels>`.
///
/// # Safety
/// As [`block`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn group<F: Format>(
    size: usize,
    panels: usize,
    x: Rows,
    a: *const u8,
    out: *mut f32,
    span: Span,
    cols: usize,
    p: usize,
) {
    macro_rules! dispatch {
        ($(($g:literal, $p:literal)),*) => {
            match (size, panels) {
                $(($g, $p) => block::<F, $g, $p>(x, a, out, span, cols, p),)*
                _ => unreachable!("{size} rows over {panels} panels"),
            }
        };
    }
    // SAFETY: as promised by the caller.
    unsafe {
        dispatch!(
            (1, 4),
            (1, 2),
            (1, 1),
            (2, 4),
            (2, 2),
            (2, 1),
            (3, 2),
            (3, 1),
            (4, 2),
            (4, 1),
            (5, 1),
            (6, 1),
            (7, 1),
            (8, 1)
        )
    }
}

/// `G` rows against the `P` panels from `p` (their blocks from `a`): per block, `G P` integer
/// sums of 16 lanes, then scaled into as many f32 chains.
///
/// # Safety
/// `x` holds `G` rows of `k`, `a` starts the blocks of `P` panels as `span` lays them out,
/// `out` `G` rows of `cols` with `p * NR < cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn block<F: Format, const G: usize, const P: usize>(
    x: Rows,
    a: *const u8,
    out: *mut f32,
    Span { k, next, stride }: Span,
    cols: usize,
    p: usize,
) {
    // SAFETY: as promised by the caller.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); P]; G];
        for b in 0..k / QK {
            let at = a.add(b * stride);
            for line in 0..P * F::UNIT / 64 {
                let ahead = at.wrapping_add(line * 64 + PREFETCH);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
            let mut sums = [[_mm512_setzero_si512(); P]; G];
            for l in 0..4 {
                let w: [([__m512i; 2], [usize; 2]); P] =
                    std::array::from_fn(|j| F::groups(at.add(j * next), l));
                let [o0, o1] = w[0].1;
                for (g, sums_g) in sums.iter_mut().enumerate() {
                    let xb = x.q.add(g * k + b * QK);
                    let x0 = _mm512_set1_epi32((xb.add(o0) as *const i32).read_unaligned());
                    let x1 = _mm512_set1_epi32((xb.add(o1) as *const i32).read_unaligned());
                    for (s, (wj, _)) in sums_g.iter_mut().zip(&w) {
                        *s = _mm512_dpbusd_epi32(*s, wj[0], x0);
                        *s = _mm512_dpbusd_epi32(*s, wj[1], x1);
                    }
                }
            }
            let scales: [(__m512, __m512); P] =
                std::array::from_fn(|j| F::scales(at.add(j * next)));
            for g in 0..G {
                let per = k / QK;
                let s_b = _mm512_set1_ps(*x.scale.add(g * per + b));
                let x_b = *x.sum.add(g * per + b);
                for j in 0..P {
                    let (d, m) = scales[j];
                    let t = if F::Q8 {
                        let s = _mm512_sub_epi32(sums[g][j], _mm512_set1_epi32(128 * x_b));
                        _mm512_mul_ps(d, _mm512_cvtepi32_ps(s))
                    } else {
                        let mx = _mm512_mul_ps(m, _mm512_set1_ps(x_b as f32));
                        _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sums[g][j]), mx)
                    };
                    acc[g][j] = _mm512_fmadd_ps(s_b, t, acc[g][j]);
                }
            }
        }
        for (g, accg) in acc.iter().enumerate() {
            for (j, accj) in accg.iter().enumerate() {
                let c = (p + j) * NR;
                let mask = ((1u32 << (cols - c).min(NR)) - 1) as __mmask16;
                _mm512_mask_storeu_ps(out.add(g * cols + c), mask, *accj);
            }
        }
    }
}
