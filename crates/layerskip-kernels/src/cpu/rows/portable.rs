//! The reference order, in scalar code: what the SIMD kernels must reproduce bit for bit.

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
