//! The AVX2 kernel: `vpmaddubsw` multiplies pairs of unsigned by signed bytes into 16-bit sums
//! and `vpmaddwd` adds those pairs into 32-bit lanes, a lane per column, as llama.cpp does
//! without VNNI. A panel's 16 columns are two 8-lane halves.

use std::arch::x86_64::*;

use super::super::{Lines, NR, Panels, QK, Span, passes};
use super::Activations;

/// Rows whose sums share a pass over a panel's blocks.
const MR: usize = 4;

/// The panels `p0..p1` of `x · w` for quantized `w`, one panel at a time, rows in groups of at
/// most [`MR`] ([`passes`]).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; as [`super::portable`].
#[target_feature(enable = "avx2,fma,f16c")]
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
    let (q8, unit, blocks) = match &w.lines {
        Lines::Q8(l) => (true, size_of::<super::super::Q8Block>(), l.as_ptr().cast()),
        Lines::Q4(l, _) => (false, size_of::<super::super::Q4Block>(), l.as_ptr().cast()),
        _ => unreachable!("integer products need quantized panels"),
    };
    let k = shape.k;
    let blocks: *const u8 = blocks;
    passes(
        shape,
        (QK, unit),
        (rows, MR),
        (p0, p1),
        |_| 1,
        |pass| {
            let (r, size, p, span) = (pass.r, pass.size, pass.p, pass.span);
            // SAFETY: every offset stays within the shapes promised by the caller.
            unsafe {
                let (a, or) = (blocks.add(pass.offset), out.add(r * cols));
                let rows_at = (
                    x.q.as_ptr().add(r * k),
                    x.scale.as_ptr().add(r * k / QK),
                    x.sum.as_ptr().add(r * k / QK),
                );
                match (q8, size) {
                    (true, 1) => panel::<true, 1>(rows_at, a, or, span, cols, p),
                    (true, 2) => panel::<true, 2>(rows_at, a, or, span, cols, p),
                    (true, 3) => panel::<true, 3>(rows_at, a, or, span, cols, p),
                    (true, _) => panel::<true, MR>(rows_at, a, or, span, cols, p),
                    (false, 1) => panel::<false, 1>(rows_at, a, or, span, cols, p),
                    (false, 2) => panel::<false, 2>(rows_at, a, or, span, cols, p),
                    (false, 3) => panel::<false, 3>(rows_at, a, or, span, cols, p),
                    (false, _) => panel::<false, MR>(rows_at, a, or, span, cols, p),
                }
            }
        },
    );
}

/// `G` rows against panel `p` (its blocks from `a`, each `stride` bytes after the one before).
///
/// # Safety
/// `x` holds `G` rows of `k` bytes and their `k / QK` scales and sums, `a` starts the blocks of
/// a panel of format Q8_0 (when `Q8`) or 4-bit, `out` `G` rows of `cols` with `p * NR < cols`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn panel<const Q8: bool, const G: usize>(
    (xq, xs, xsum): (*const i8, *const f32, *const i32),
    a: *const u8,
    out: *mut f32,
    Span { k, stride, .. }: Span,
    cols: usize,
    p: usize,
) {
    // SAFETY: as promised by the caller.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0f);
        // Four features of a row times four of each column, summed into the column's lane.
        let dot = |w: __m256i, x: __m256i| {
            let pairs = if Q8 {
                _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x))
            } else {
                _mm256_maddubs_epi16(w, x)
            };
            _mm256_madd_epi16(pairs, ones)
        };
        let mut acc = [[_mm256_setzero_ps(); 2]; G];
        let per = k / QK;
        for b in 0..per {
            let block = a.add(b * stride);
            let mut sums = [[_mm256_setzero_si256(); 2]; G];
            for l in 0..4 {
                // Two groups of four features for the 16 columns: `[group][half]`.
                let (w, offsets): ([[__m256i; 2]; 2], [usize; 2]) = if Q8 {
                    let at = |h: usize, half: usize| {
                        _mm256_load_si256(block.add(64 + h * 64 + half * 32) as *const __m256i)
                    };
                    (
                        [
                            [at(2 * l, 0), at(2 * l, 1)],
                            [at(2 * l + 1, 0), at(2 * l + 1, 1)],
                        ],
                        [8 * l, 8 * l + 4],
                    )
                } else {
                    let at = |half: usize| {
                        _mm256_load_si256(block.add(64 + l * 64 + half * 32) as *const __m256i)
                    };
                    let (v0, v1) = (at(0), at(1));
                    let hi = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                    (
                        [
                            [_mm256_and_si256(v0, low), _mm256_and_si256(v1, low)],
                            [hi(v0), hi(v1)],
                        ],
                        [4 * l, 16 + 4 * l],
                    )
                };
                for (g, sums_g) in sums.iter_mut().enumerate() {
                    let xb = xq.add(g * k + b * QK);
                    for (wg, o) in w.iter().zip(offsets) {
                        let xv = _mm256_set1_epi32((xb.add(o) as *const i32).read_unaligned());
                        sums_g[0] = _mm256_add_epi32(sums_g[0], dot(wg[0], xv));
                        sums_g[1] = _mm256_add_epi32(sums_g[1], dot(wg[1], xv));
                    }
                }
            }
            // Q8_0: 16 f32 scales; 4-bit: 16 f16 scales, then 16 f16 offsets.
            let f16s = |at: usize| _mm256_cvtph_ps(_mm_load_si128(block.add(at) as *const __m128i));
            let (d, m) = if Q8 {
                let d = [0, 8].map(|h| _mm256_load_ps((block as *const f32).add(h)));
                (d, [_mm256_setzero_ps(); 2])
            } else {
                ([f16s(0), f16s(16)], [f16s(32), f16s(48)])
            };
            for g in 0..G {
                let s_b = _mm256_set1_ps(*xs.add(g * per + b));
                let x_b = *xsum.add(g * per + b);
                for h in 0..2 {
                    let s = _mm256_cvtepi32_ps(sums[g][h]);
                    let t = if Q8 {
                        _mm256_mul_ps(d[h], s)
                    } else {
                        _mm256_fmadd_ps(d[h], s, _mm256_mul_ps(m[h], _mm256_set1_ps(x_b as f32)))
                    };
                    acc[g][h] = _mm256_fmadd_ps(s_b, t, acc[g][h]);
                }
            }
        }
        let c = p * NR;
        let n = (cols - c).min(NR);
        for (g, accg) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; NR];
            _mm256_storeu_ps(lanes.as_mut_ptr(), accg[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), accg[1]);
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), out.add(g * cols + c), n);
        }
    }
}
