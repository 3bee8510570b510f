//! The LM head fused with cross-entropy, for training: the loss of `x · Wᵀ` against target ids
//! and its gradients with respect to `x` and `W`, computed a chunk of rows at a time so that no
//! `[rows, vocab]` logits (nor their gradient) is ever held whole (llm.c's fused classifier).
//!
//! Per chunk of [`CHUNK`] rows: the logits by one product, then per row the log-sum-exp, the
//! loss and, in place of the logits, their gradient `w_r (softmax - onehot)`; then the two
//! products of the gradient (`dx = dz · W`, `dW += dzᵀ · x`). Rows are independent and the
//! products split over output blocks only, so the result does not depend on the thread count.

use rayon::prelude::*;

use super::gemm::{Mat, Threads};
use super::linear::{Operands, Rhs};

/// Rows per chunk: the chunk's logits (`CHUNK x vocab` f32) stay small next to the whole.
pub const CHUNK: usize = 256;

/// How the head's weight `W` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLayout {
    /// `[vocab, hidden]`: a token embedding read as a tied head.
    OutIn,
    /// `[hidden, vocab]`: an untied head in Burn's `Linear` layout.
    InOut,
}

/// The shapes of a fused head + cross-entropy call.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    /// Rows of `x` (positions).
    pub rows: usize,
    /// Width of `x`.
    pub hidden: usize,
    /// Logits per row.
    pub vocab: usize,
    /// How `W` is stored.
    pub layout: HeadLayout,
    /// The precision of the products' operands (the loss and softmax are f32 either way).
    pub operands: Operands,
}

/// Where the gradients go: `x` `[rows, hidden]` and `w` in `W`'s layout (overwritten).
pub struct HeadGrads<'a> {
    /// d loss / d x.
    pub x: &'a mut [f32],
    /// d loss / d W.
    pub w: &'a mut [f32],
}

/// `sum_r weights[r] * CE(x_r · Wᵀ, targets[r])` (natural log), and with `grads` its gradients.
/// A row of weight 0 adds nothing and gets a zero gradient (its target is not read).
///
/// # Shapes
/// - `x`: `[rows, hidden]`; `w`: `[vocab, hidden]` ([`HeadLayout::OutIn`]) or `[hidden, vocab]`;
///   `targets`, `weights`: `[rows]`
pub fn head_cross_entropy(
    x: &[f32],
    w: &[f32],
    shape: &HeadShape,
    targets: &[u32],
    weights: &[f32],
    mut grads: Option<HeadGrads<'_>>,
) -> f64 {
    let HeadShape {
        rows,
        hidden: h,
        vocab: v,
        layout,
        operands,
    } = *shape;
    assert!(
        x.len() == rows * h && w.len() == v * h,
        "head_cross_entropy: shapes"
    );
    assert!(targets.len() == rows && weights.len() == rows);
    if let Some(g) = grads.as_mut() {
        assert!(g.x.len() == x.len() && g.w.len() == w.len());
        g.w.fill(0.0);
    }
    // W as the right operand of `x · Wᵀ` ([hidden, vocab]) and of `dz · W` ([vocab, hidden]).
    let (wt, wn) = match layout {
        HeadLayout::OutIn => (Mat::new(w, 1, h), Mat::new(w, h, 1)),
        HeadLayout::InOut => (Mat::new(w, v, 1), Mat::new(w, 1, v)),
    };
    let wt = Rhs::new(wt, h, v, operands);
    let wn = grads.is_some().then(|| Rhs::new(wn, v, h, operands));
    let want_grads = grads.is_some();
    let mut z = vec![0f32; CHUNK.min(rows) * v];
    let mut losses = vec![0f64; rows];
    for start in (0..rows).step_by(CHUNK) {
        let c = CHUNK.min(rows - start);
        let xc = &x[start * h..(start + c) * h];
        let zc = &mut z[..c * v];
        wt.multiply(zc, v, false, Mat::new(xc, h, 1), c, Threads::All);
        let (tc, wc) = (&targets[start..start + c], &weights[start..start + c]);
        zc.par_chunks_mut(v)
            .zip(losses[start..start + c].par_iter_mut())
            .enumerate()
            .for_each(|(r, (row, loss))| *loss = row_loss(row, tc[r], wc[r], want_grads));
        if let (Some(g), Some(wn)) = (grads.as_mut(), &wn) {
            let dz = Mat::new(zc, v, 1);
            wn.multiply(
                &mut g.x[start * h..(start + c) * h],
                h,
                false,
                dz,
                c,
                Threads::All,
            );
            match layout {
                // dW [vocab, hidden] += dzᵀ · x
                HeadLayout::OutIn => {
                    let xc = Rhs::new(Mat::new(xc, h, 1), c, h, operands);
                    xc.multiply(g.w, h, true, dz.t(), v, Threads::All);
                }
                // dW [hidden, vocab] += xᵀ · dz
                HeadLayout::InOut => {
                    let dz = Rhs::new(dz, c, v, operands);
                    dz.multiply(g.w, v, true, Mat::new(xc, h, 1).t(), h, Threads::All);
                }
            }
        }
    }
    losses.iter().sum()
}

/// One row's weighted loss `weight * (logsumexp(z) - z[target])`; with `grad`, `z` becomes
/// `weight * (softmax(z) - onehot(target))`.
fn row_loss(z: &mut [f32], target: u32, weight: f32, grad: bool) -> f64 {
    if weight == 0.0 {
        if grad {
            z.fill(0.0);
        }
        return 0.0;
    }
    let t = target as usize;
    assert!(
        t < z.len(),
        "target id {t} outside the vocabulary of {}",
        z.len()
    );
    let picked = z[t];
    let Some(max) = max_unless_nan(z) else {
        // Non-finite logits must surface as a NaN loss, not be clamped away.
        z.fill(f32::NAN);
        return f64::NAN;
    };
    let sum = exp_shifted(z, max);
    let lse = max as f64 + (sum as f64).ln();
    if grad {
        let scale = weight / sum;
        z.iter_mut().for_each(|e| *e *= scale);
        z[t] -= weight;
    }
    weight as f64 * (lse - picked as f64)
}

/// The largest value of `z` (at least `-inf`), or `None` if any is NaN.
pub(crate) fn max_unless_nan(z: &[f32]) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { max_unless_nan_avx2(z) };
    }
    let (mut max, mut nan) = (f32::NEG_INFINITY, false);
    for &v in z {
        nan |= v.is_nan();
        max = max.max(v);
    }
    (!nan).then_some(max)
}

/// [`max_unless_nan`] with AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn max_unless_nan_avx2(z: &[f32]) -> Option<f32> {
    use std::arch::x86_64::*;
    let body = z.len() / 8 * 8;
    let (mut max, mut nan) = (f32::NEG_INFINITY, false);
    for &v in &z[body..] {
        nan |= v.is_nan();
        max = max.max(v);
    }
    // SAFETY: the offsets stay below `body <= len`; the caller's promise covers the intrinsics.
    unsafe {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut unordered = _mm256_setzero_ps();
        let mut i = 0;
        while i < body {
            let v = _mm256_loadu_ps(z.as_ptr().add(i));
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            m = _mm256_max_ps(m, v);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        nan |= _mm256_movemask_ps(unordered) != 0;
        max = lanes.iter().fold(max, |a, &b| a.max(b));
    }
    (!nan).then_some(max)
}

/// `z[i] = exp(z[i] - max)` in place (vectorised where the CPU has AVX2 and FMA; arguments
/// must not be NaN); returns the sum.
pub(crate) fn exp_shifted(z: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { exp_shifted_avx2(z, max) };
    }
    let mut sum = 0.0;
    for e in z.iter_mut() {
        *e = (*e - max).exp();
        sum += *e;
    }
    sum
}

/// [`exp_shifted`] with AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(z: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let body = z.len() / 8 * 8;
    let mut tail = 0.0;
    for e in &mut z[body..] {
        *e = (*e - max).exp();
        tail += *e;
    }
    // SAFETY: the offsets stay below `body <= len`; the caller's promise covers the intrinsics.
    unsafe {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let p = z.as_mut_ptr();
        let mut i = 0;
        while i < body {
            let e = super::exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes.iter().sum::<f32>() + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss and gradients by the definitions, in f64.
    fn reference(
        x: &[f32],
        w: &[f32],
        s: &HeadShape,
        targets: &[u32],
        weights: &[f32],
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let (h, v) = (s.hidden, s.vocab);
        let wi = |o: usize, i: usize| match s.layout {
            HeadLayout::OutIn => o * h + i,
            HeadLayout::InOut => i * v + o,
        };
        let (mut loss, mut dx, mut dw) = (0.0, vec![0.0; x.len()], vec![0.0; w.len()]);
        for r in 0..s.rows {
            let z: Vec<f64> = (0..v)
                .map(|o| {
                    (0..h)
                        .map(|i| x[r * h + i] as f64 * w[wi(o, i)] as f64)
                        .sum()
                })
                .collect();
            let max = z.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = z.iter().map(|e| (e - max).exp()).sum();
            let t = targets[r] as usize;
            let wr = weights[r] as f64;
            loss += wr * (max + sum.ln() - z[t]);
            for o in 0..v {
                let dz = wr * ((z[o] - max).exp() / sum - if o == t { 1.0 } else { 0.0 });
                for i in 0..h {
                    dx[r * h + i] += dz * w[wi(o, i)] as f64;
                    dw[wi(o, i)] += dz * x[r * h + i] as f64;
                }
            }
        }
        (loss, dx, dw)
    }

    fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * scale
            })
            .collect()
    }

    #[test]
    fn loss_and_gradients_match_the_definition() {
        // More rows than a chunk (a partial last chunk), a vocabulary that is not a multiple of
        // the vector width, masked rows. With bf16 operands, against the definition on the
        // rounded x and W: the loss as closely, the gradients (whose products also round the
        // logits' gradient) to 1%.
        let cases = [HeadLayout::OutIn, HeadLayout::InOut]
            .into_iter()
            .flat_map(|l| [(l, Operands::F32), (l, Operands::Bf16)]);
        for (layout, operands) in cases {
            let s = HeadShape {
                rows: CHUNK + 37,
                hidden: 24,
                vocab: 67,
                layout,
                operands,
            };
            let x = values(s.rows * s.hidden, 1, 2.0);
            let w = values(s.vocab * s.hidden, 2, 1.0);
            let targets: Vec<u32> = (0..s.rows).map(|r| (r * 31 % s.vocab) as u32).collect();
            let weights: Vec<f32> = (0..s.rows)
                .map(|r| if r % 7 == 3 { 0.0 } else { 1.0 / s.rows as f32 })
                .collect();
            let (mut dx, mut dw) = (vec![0.0; x.len()], vec![1.0; w.len()]);
            let grads = HeadGrads {
                x: &mut dx,
                w: &mut dw,
            };
            let loss = head_cross_entropy(&x, &w, &s, &targets, &weights, Some(grads));
            let (rounded, tolerance) = match operands {
                Operands::F32 => ((|v: &f32| *v) as fn(&f32) -> f32, 1e-5),
                Operands::Bf16 => ((|v: &f32| half::bf16::from_f32(*v).to_f32()) as _, 1e-2),
            };
            let (xr, wr): (Vec<f32>, Vec<f32>) = (
                x.iter().map(rounded).collect(),
                w.iter().map(rounded).collect(),
            );
            let (want, want_dx, want_dw) = reference(&xr, &wr, &s, &targets, &weights);
            assert!((loss - want).abs() < 1e-5 * want.abs(), "{loss} vs {want}");
            let close = |got: &[f32], want: &[f64]| {
                let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (g, w) in got.iter().zip(want) {
                    assert!((*g as f64 - w).abs() <= tolerance * scale, "{g} vs {w}");
                }
            };
            close(&dx, &want_dx);
            close(&dw, &want_dw);
            let alone = head_cross_entropy(&x, &w, &s, &targets, &weights, None);
            assert_eq!(
                alone, loss,
                "the loss does not depend on computing gradients"
            );
        }
    }

    #[test]
    fn a_nan_logit_makes_the_loss_nan() {
        let s = HeadShape {
            rows: 3,
            hidden: 4,
            vocab: 21,
            layout: HeadLayout::OutIn,
            operands: Operands::F32,
        };
        let x = values(12, 3, 1.0);
        let mut w = values(84, 4, 1.0);
        let weights = [1.0 / 3.0; 3];
        let finite = head_cross_entropy(&x, &w, &s, &[1, 2, 3], &weights, None);
        assert!(finite.is_finite());
        w[17 * 4] = f32::NAN; // one vocabulary row: a NaN logit in every row, past the vector body
        assert!(head_cross_entropy(&x, &w, &s, &[1, 2, 3], &weights, None).is_nan());
    }

    #[test]
    fn the_vector_max_equals_the_scalar_fold() {
        for n in [1, 7, 8, 9, 33] {
            let z = values(n, n as u32, 10.0);
            let want = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_unless_nan(&z), Some(want));
            let mut bad = z.clone();
            bad[n / 2] = f32::NAN;
            assert_eq!(max_unless_nan(&bad), None);
        }
    }
}
