//! Products with quantized panels (Q8_0, Q4_0, Q4_1) computed as llama.cpp computes them: each
//! row of `x` quantized to 8 bits per block of [`QK`] features ([`Activations`]), each block's
//! products summed in integers (`vpdpbusd` on AVX-512 VNNI), and the blocks' sums scaled and
//! added in f32.
//!
//! Output `c` of a row is, over its blocks `b` in order, `acc = fma(s_b, t_b, acc)` from
//! `acc = 0`, where `s_b` is the row's block scale, `S` = Σ `q_w q_x` over the block (exact in
//! i32), `X` = Σ `q_x`, and `t_b` = `d * S` (Q8_0) or `fma(d, S, m * X)` (4-bit formats: the
//! weight is `q d + m`). Integer sums do not depend on their order and each row is quantized on
//! its own, so a row's result does not depend on which rows share the call, and every kernel
//! ([`portable`], AVX2, AVX-512) gives the same bits.

use super::{Lines, NR, Panels, QK, Quantization};

/// Rows quantized to 8 bits per block of [`QK`] features: ggml's Q8_0 for activations, the
/// scale kept in f32.
pub struct Activations {
    /// `[rows, k]` signed bytes in `-127..=127`.
    pub(super) q: Vec<i8>,
    /// `[rows, k / QK]`: the block's scale (its largest magnitude over 127).
    pub(super) scale: Vec<f32>,
    /// `[rows, k / QK]`: the sum of the block's bytes.
    pub(super) sum: Vec<i32>,
    pub(super) k: usize,
}

impl Activations {
    /// `rows` rows of `k` features (`k` a multiple of [`QK`]) from `x`.
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(QK) && x.len() >= rows * k);
        let blocks = rows * k / QK;
        let mut out = Activations {
            q: vec![0; rows * k],
            scale: vec![0.0; blocks],
            sum: vec![0; blocks],
            k,
        };
        let parts = x[..rows * k]
            .chunks_exact(QK)
            .zip(out.q.chunks_exact_mut(QK));
        for ((block, q), (scale, sum)) in parts.zip(out.scale.iter_mut().zip(&mut out.sum)) {
            let block: &[f32; QK] = block.try_into().expect("QK values");
            let (d, values) = quantize_activations(block);
            q.copy_from_slice(&values);
            *scale = d;
            *sum = values.iter().map(|&v| i32::from(v)).sum();
        }
        out
    }

    /// Row `r`'s bytes and its blocks' scales and sums.
    fn row(&self, r: usize) -> (&[i8], &[f32], &[i32]) {
        let per = self.k / QK;
        (
            &self.q[r * self.k..(r + 1) * self.k],
            &self.scale[r * per..(r + 1) * per],
            &self.sum[r * per..(r + 1) * per],
        )
    }
}

/// One block of activations as ggml's `quantize_row_q8_0` makes it, the scale `amax / 127` left
/// in f32 and the quotients rounded to nearest, ties to even (ggml rounds them away from zero):
/// adding and subtracting 1.5 * 2^23 rounds a value below 2^22 in magnitude in the current
/// rounding mode, two vector instructions where a rounding call per value would cost more than
/// the product of a decode step's row.
pub fn quantize_activations(block: &[f32; QK]) -> (f32, [i8; QK]) {
    const ROUND: f32 = 12_582_912.0;
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, block.map(|v| ((v * id + ROUND) - ROUND) as i8))
}

/// A kernel over the panels `p0..p1`: `(x, w, out, rows, cols, p0, p1)`.
pub(super) type BlockRange = unsafe fn(&Activations, &Panels, *mut f32, usize, usize, usize, usize);

/// Block `b`'s contribution `t_b` (see the module's documentation) for scale `d`, offset `m`,
/// integer sum `s` and activation sum `x`.
#[inline(always)]
pub(super) fn block_term(q8: bool, (d, m): (f32, f32), s: i32, x: i32) -> f32 {
    if q8 {
        d * s as f32
    } else {
        d.mul_add(s as f32, m * x as f32)
    }
}

/// The reference order, in scalar code: what the SIMD kernels reproduce bit for bit.
///
/// # Safety
/// `out` holds `rows` rows of `cols`; `x` holds `rows` rows of `w.k`; `p1 * NR` does not pass
/// `cols` by a whole panel; `w` is quantized.
pub unsafe fn portable(
    x: &Activations,
    w: &Panels,
    out: *mut f32,
    rows: usize,
    cols: usize,
    p0: usize,
    p1: usize,
) {
    let q8 = w.quantization() == Some(Quantization::Q8_0);
    debug_assert!(matches!(w.lines, Lines::Q8(_) | Lines::Q4(..)));
    for r in 0..rows {
        let (xq, scales, sums) = x.row(r);
        for p in p0..p1 {
            for j in 0..NR.min(cols - p * NR) {
                let mut acc = 0.0f32;
                for (b, (&s_b, &x_b)) in scales.iter().zip(sums).enumerate() {
                    let s: i32 = (b * QK..(b + 1) * QK)
                        .map(|i| w.integer_weight(p, i, j) * i32::from(xq[i]))
                        .sum();
                    let t = block_term(q8, w.block_scales(p, b, j), s, x_b);
                    acc = s_b.mul_add(t, acc);
                }
                // SAFETY: r < rows and p * NR + j < cols.
                unsafe { *out.add(r * cols + p * NR + j) = acc };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2;

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512;
