//! RMSNorm's backward for training: `y = x / rms(x) * gain` over the last dimension, with
//! `rms(x) = sqrt(mean(x²) + eps)`.

use rayon::prelude::*;

/// Rows per task of [`rms_norm_backward`]: the gain's gradient is summed per block of rows and
/// the blocks' sums added in order, so the result does not depend on the thread count.
const BLOCK: usize = 64;

/// The gradients of RMSNorm with respect to `x` and the gain, given the gradient `dy` of its
/// output: `dx_i = (g_i dy_i - x_i / rms² * mean_j(g_j dy_j x_j)) / rms` and
/// `d_gain_i = sum over rows of dy_i x_i / rms`.
///
/// # Shapes
/// - `x`, `dy`, `dx`: `[rows, n]`; `gain`, `d_gain`: `[n]`
pub fn rms_norm_backward(
    x: &[f32],
    gain: &[f32],
    eps: f32,
    dy: &[f32],
    dx: &mut [f32],
    d_gain: &mut [f32],
) {
    let n = gain.len();
    assert!(n > 0 && x.len().is_multiple_of(n) && dy.len() == x.len() && dx.len() == x.len());
    assert_eq!(d_gain.len(), n);
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(BLOCK * n)
        .enumerate()
        .map(|(block, dx)| {
            let mut dg = vec![0f32; n];
            let start = block * BLOCK * n;
            for (r, dxr) in dx.chunks_mut(n).enumerate() {
                let at = start + r * n;
                let (xr, dyr) = (&x[at..at + n], &dy[at..at + n]);
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
                let inv = 1.0 / (ms + eps).sqrt();
                let dot: f32 = (0..n).map(|i| gain[i] * dyr[i] * xr[i]).sum::<f32>() / n as f32;
                let k = dot * inv * inv;
                for i in 0..n {
                    dxr[i] = (gain[i] * dyr[i] - xr[i] * k) * inv;
                    dg[i] += dyr[i] * xr[i] * inv;
                }
            }
            dg
        })
        .collect();
    d_gain.fill(0.0);
    for dg in partials {
        d_gain.iter_mut().zip(dg).for_each(|(a, b)| *a += b);
    }
}
