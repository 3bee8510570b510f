//! The AVX-512 kernels: one 16-lane vector per panel of 16 columns.

use std::arch::x86_64::*;

use super::{NR, Panels, Span};

/// Most rows whose accumulators share a pass over the panels: 8 rows x 2 panels = 16 of
/// the 32 registers, with room for the weights and a broadcast.
const MR: usize = 8;

/// How a kernel reads one feature's 16 weights of a panel as one f32 vector.
trait Load {
    /// Bytes per unit.
    const UNIT: usize;
    /// Feature `i` of the panel whose first unit is at `panel`, each unit `stride` bytes
    /// after the one before.
    ///
    /// # Safety
    /// `panel` is an aligned panel of this kind with more than `i` features; the CPU has
    /// AVX-512F.
    unsafe fn load(panel: *const u8, i: usize, stride: usize, odd: bool) -> __m512;

    /// Feature `i` of the even panel at `panel` and of the next one, `next` bytes further.
    ///
    /// # Safety
    /// As [`Load::load`], for both panels.
    #[inline(always)]
    unsafe fn pair(panel: *const u8, next: usize, i: usize, stride: usize) -> [__m512; 2] {
        // SAFETY: as promised by the caller.
        unsafe {
            [
                Self::load(panel, i, stride, false),
                Self::load(panel.add(next), i, stride, true),
            ]
        }
    }
}

struct F32;
impl Load for F32 {
    const UNIT: usize = 64;
    #[inline(always)]
    unsafe fn load(panel: *const u8, i: usize, stride: usize, _odd: bool) -> __m512 {
        // SAFETY: as promised by the caller.
        unsafe { _mm512_load_ps(panel.add(i * stride) as *const f32) }
    }
}

/// bfloat16 widened exactly: zero-extended to 32 bits, shifted into the upper half.
struct Bf16;
impl Load for Bf16 {
    const UNIT: usize = 32;
    #[inline(always)]
    unsafe fn load(panel: *const u8, i: usize, stride: usize, _odd: bool) -> __m512 {
        // SAFETY: as promised by the caller.
        unsafe {
            let h = _mm256_load_si256(panel.add(i * stride) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

/// [`super::HalfPair`]s of tiled panels: the even panel's column `c` in the low half of 32-bit
/// word `c`, the odd panel's in its high half; one read widens into both, a shift and a mask.
struct Bf16Pairs;
impl Load for Bf16Pairs {
    const UNIT: usize = 32;
    #[inline(always)]
    unsafe fn load(panel: *const u8, i: usize, stride: usize, odd: bool) -> __m512 {
        // SAFETY: as promised by the caller (an odd panel's line is the second half of its
        // pair's 64 bytes, which are aligned).
        unsafe {
            let pair = panel.sub(usize::from(odd) * 32).add(i * stride);
            let v = _mm512_load_si512(pair as *const __m512i);
            _mm512_castsi512_ps(if odd {
                _mm512_and_si512(v, _mm512_set1_epi32(-65536))
            } else {
                _mm512_slli_epi32::<16>(v)
            })
        }
    }

    #[inline(always)]
    unsafe fn pair(panel: *const u8, _next: usize, i: usize, stride: usize) -> [__m512; 2] {
        // SAFETY: as promised by the caller.
        unsafe {
            let v = _mm512_load_si512(panel.add(i * stride) as *const __m512i);
            [
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536))),
            ]
        }
    }
}

/// The panels `p0..p1` of `x · w`: rows in groups of at most [`MR`] (as even as
/// possible), each group streaming four panels at a time when it has one or two rows
/// (four to eight independent chains hide the FMA latency) and two otherwise.
///
/// # Safety
/// The CPU has AVX-512F; as [`super::portable::panels`].
#[target_feature(enable = "avx512f")]
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

/// [`panels`] over lines of kind `W`.
///
/// # Safety
/// As [`panels`], `lines` holding the panels' lines.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
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
    // A tile's panels are read all four at once (two passes over half a tile each were
    // slower than two row groups each reading it whole): groups of up to six rows, 24
    // accumulators. Panels of f32 lines, each its own stream, go in pairs for groups of
    // three or more rows, up to eight rows (16 accumulators).
    let (k, tiled) = (shape.k, shape.tile > 1);
    let mr = if tiled { 6 } else { MR };
    let wide = |size: usize| if !tiled && size > 2 { 2 } else { 4 };
    super::passes(shape, (1, W::UNIT), (rows, mr), (p0, p1), wide, |pass| {
        // SAFETY: every offset stays within the shapes promised by the caller.
        unsafe {
            let (xr, or) = (x.as_ptr().add(pass.r * k), out.add(pass.r * cols));
            let a = lines.add(pass.offset);
            group::<W>(pass.size, pass.take, xr, a, or, pass.span, cols, pass.p);
        }
    });
}

/// `block::<W, size, panels>`.
///
/// # Safety
/// As [`block`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn group<W: Load>(
    size: usize,
    panels: usize,
    x: *const f32,
    a: *const u8,
    out: *mut f32,
    span: Span,
    cols: usize,
    p: usize,
) {
    macro_rules! dispatch {
        ($($g:literal),*) => {
            match (size, panels) {
                $(
                    ($g, 4) => block::<W, $g, 4>(x, a, out, span, cols, p),
                    ($g, 2) => block::<W, $g, 2>(x, a, out, span, cols, p),
                    ($g, _) => block::<W, $g, 1>(x, a, out, span, cols, p),
                )*
                _ => unreachable!("groups have 1..={MR} rows"),
            }
        };
    }
    // SAFETY: as promised by the caller.
    unsafe { dispatch!(1, 2, 3, 4, 5, 6, 7, 8) }
}

/// `G` rows against the `P` panels from `p` (their lines from `a`): `G P` chains of 16
/// lanes.
///
/// # Safety
/// `x` holds `G` rows of `k`, `a` starts the units of `P` panels as `span` lays them out,
/// `out` `G` rows of `cols` with `p * NR < cols`.
#[target_feature(enable = "avx512f")]
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
        let mut acc = [[_mm512_setzero_ps(); P]; G];
        let mut i = 0;
        while i < k {
            super::prefetch(a, i, P, (next, stride), W::UNIT);
            let w: [__m512; P] = if P >= 2 && p.is_multiple_of(2) {
                let mut w = [_mm512_setzero_ps(); P];
                for j in (0..P).step_by(2) {
                    [w[j], w[j + 1]] = W::pair(a.add(j * next), next, i, stride);
                }
                w
            } else {
                std::array::from_fn(|j| W::load(a.add(j * next), i, stride, (p + j) % 2 == 1))
            };
            for (g, accg) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(g * k + i));
                for (accj, wj) in accg.iter_mut().zip(&w) {
                    *accj = _mm512_fmadd_ps(xv, *wj, *accj);
                }
            }
            i += 1;
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
