//! Causal grouped-query self-attention for training, forward and backward, over whole sequences
//! in the projections' layout (`[batch, seq, heads, head_dim]`, no per-head copies by the
//! caller): per (sequence, head) the scores `Q Kᵀ` by one product, a causal softmax whose
//! log-sum-exp is kept, and `P V`; the backward recomputes `P` from the kept log-sum-exp
//! (FlashAttention-2's recipe at the granularity of a whole head) instead of holding the
//! `[seq, seq]` probabilities of every head between the passes.
//!
//! Work is split over (sequence, kv head) pairs; each pair's heads run in order, so the
//! result does not depend on the thread count.

use rayon::prelude::*;

use super::cross_entropy::{exp_shifted, max_unless_nan};
use super::gemm::{Mat, Threads, product};

/// The shapes of a training attention call: query head `h` reads kv head `h / (heads /
/// kv_heads)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfAttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

impl SelfAttentionShape {
    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn check(&self, q: usize, kv: usize) {
        let Self {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
        } = *self;
        assert!(kv_heads > 0 && heads.is_multiple_of(kv_heads), "{self:?}");
        assert_eq!(q, batch * seq * heads * head_dim, "queries of {self:?}");
        assert_eq!(
            kv,
            batch * seq * kv_heads * head_dim,
            "keys/values of {self:?}"
        );
    }
}

/// `out = softmax(Q Kᵀ / sqrt(d), causal) V` per head; `lse` `[batch, heads, seq]` receives each
/// row's log-sum-exp of the scaled scores (what [`causal_attention_backward`] needs). A row
/// whose scores hold a NaN gives NaN outputs.
///
/// # Shapes
/// - `q`, `out`: `[batch, seq, heads, head_dim]`; `k`, `v`: `[batch, seq, kv_heads, head_dim]`
pub fn causal_attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &SelfAttentionShape,
    out: &mut [f32],
    lse: &mut [f32],
) {
    shape.check(q.len(), k.len());
    assert!(v.len() == k.len() && out.len() == q.len());
    let SelfAttentionShape {
        batch,
        seq,
        heads,
        head_dim: d,
        ..
    } = *shape;
    assert_eq!(lse.len(), batch * heads * seq);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..batch * heads)
        .into_par_iter()
        .map(|task| {
            let (b, h) = (task / heads, task % heads);
            let mut p = vec![0f32; seq * seq];
            let mut o = vec![0f32; seq * d];
            let mut l = vec![0f32; seq];
            let view = Head::new(shape, b, h);
            view.probabilities(q, k, &mut p, Some(&mut l));
            // O = P V, each block of rows over the positions it sees.
            for (i0, i1) in blocks(seq) {
                let pb = Mat::new(&p[i0 * seq..], seq, 1);
                product(
                    &mut o[i0 * d..],
                    d,
                    false,
                    pb,
                    view.kv(v),
                    [i1 - i0, d, i1],
                    Threads::One,
                );
            }
            (o, l)
        })
        .collect();
    for (task, (o, l)) in parts.into_iter().enumerate() {
        let (b, h) = (task / heads, task % heads);
        for i in 0..seq {
            let at = ((b * seq + i) * heads + h) * d;
            out[at..at + d].copy_from_slice(&o[i * d..(i + 1) * d]);
        }
        lse[task * seq..(task + 1) * seq].copy_from_slice(&l);
    }
}

/// The gradients of [`causal_attention_forward`] with respect to `q`, `k` and `v`, given the
/// forward's `out` and `lse` and the gradient `dout` of its output (written to `dq`, `dk`, `dv`).
///
/// # Shapes
/// - as [`causal_attention_forward`]; `dout`, `dq` like `q`; `dk`, `dv` like `k`
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward(
    [q, k, v]: [&[f32]; 3],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    shape: &SelfAttentionShape,
    [dq, dk, dv]: [&mut [f32]; 3],
) {
    shape.check(q.len(), k.len());
    assert!(out.len() == q.len() && dout.len() == q.len() && dq.len() == q.len());
    assert!(dk.len() == k.len() && dv.len() == k.len() && v.len() == k.len());
    let SelfAttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim: d,
    } = *shape;
    let groups = shape.groups();
    let scale = 1.0 / (d as f32).sqrt();
    // Per (sequence, kv head): dQ of each of its query heads, then its dK and dV.
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..batch * kv_heads)
        .into_par_iter()
        .map(|task| {
            let (b, g) = (task / kv_heads, task % kv_heads);
            let mut p = vec![0f32; seq * seq];
            let mut dp = vec![0f32; seq * seq];
            let mut dqs = vec![0f32; groups * seq * d];
            let (mut dkg, mut dvg) = (vec![0f32; seq * d], vec![0f32; seq * d]);
            for (j, dqh) in dqs.chunks_mut(seq * d).enumerate() {
                let h = g * groups + j;
                let view = Head::new(shape, b, h);
                let lse = &lse[(b * heads + h) * seq..(b * heads + h + 1) * seq];
                view.recompute(q, k, lse, &mut p);
                let (dov, ov) = (view.q(dout), view.q(out));
                // dP = dO Vᵀ, then dS = P ⊙ (dP - rowsum(dO ⊙ O)) times the scores' scale, in
                // place; each block of rows over the positions it sees (P is 0 past them).
                for (i0, i1) in blocks(seq) {
                    let dpb = &mut dp[i0 * seq..];
                    product(
                        dpb,
                        seq,
                        false,
                        dov.rows_from(i0),
                        view.kv(v).t(),
                        [i1 - i0, i1, d],
                        Threads::One,
                    );
                    for i in i0..i1 {
                        let delta: f32 = (0..d).map(|c| dov.at(i, c) * ov.at(i, c)).sum();
                        let (pr, dpr) = (&p[i * seq..i * seq + i1], &mut dp[i * seq..i * seq + i1]);
                        for (x, &pv) in dpr.iter_mut().zip(pr) {
                            *x = pv * (*x - delta) * scale;
                        }
                    }
                }
                for (i0, i1) in blocks(seq) {
                    let (pb, dsb) = (
                        Mat::new(&p[i0 * seq..], seq, 1),
                        Mat::new(&dp[i0 * seq..], seq, 1),
                    );
                    let m = i1 - i0;
                    // dV[..i1] += Pᵀ dO; dK[..i1] += dSᵀ Q (the accumulators start at 0)
                    product(
                        &mut dvg,
                        d,
                        true,
                        pb.t(),
                        dov.rows_from(i0),
                        [i1, d, m],
                        Threads::One,
                    );
                    product(
                        &mut dkg,
                        d,
                        true,
                        dsb.t(),
                        view.q(q).rows_from(i0),
                        [i1, d, m],
                        Threads::One,
                    );
                    // dQ = dS K
                    product(
                        &mut dqh[i0 * d..],
                        d,
                        false,
                        dsb,
                        view.kv(k),
                        [m, d, i1],
                        Threads::One,
                    );
                }
            }
            (dqs, dkg, dvg)
        })
        .collect();
    for (task, (dqs, dkg, dvg)) in parts.into_iter().enumerate() {
        let (b, g) = (task / kv_heads, task % kv_heads);
        for i in 0..seq {
            let at = ((b * seq + i) * kv_heads + g) * d;
            dk[at..at + d].copy_from_slice(&dkg[i * d..(i + 1) * d]);
            dv[at..at + d].copy_from_slice(&dvg[i * d..(i + 1) * d]);
            for j in 0..groups {
                let at = ((b * seq + i) * heads + g * groups + j) * d;
                let from = (j * seq + i) * d;
                dq[at..at + d].copy_from_slice(&dqs[from..from + d]);
            }
        }
    }
}

/// One (sequence, query head) of a call: where its rows lie in the strided inputs.
struct Head {
    seq: usize,
    d: usize,
    /// Offset and row stride of the query head in `[batch, seq, heads, d]`.
    q_at: usize,
    q_row: usize,
    /// Offset and row stride of its kv head in `[batch, seq, kv_heads, d]`.
    kv_at: usize,
    kv_row: usize,
}

impl Head {
    fn new(s: &SelfAttentionShape, b: usize, h: usize) -> Self {
        let d = s.head_dim;
        Self {
            seq: s.seq,
            d,
            q_at: (b * s.seq * s.heads + h) * d,
            q_row: s.heads * d,
            kv_at: (b * s.seq * s.kv_heads + h / s.groups()) * d,
            kv_row: s.kv_heads * d,
        }
    }

    /// This head's `[seq, d]` rows of a query-shaped tensor.
    fn q<'a>(&self, t: &'a [f32]) -> Mat<'a> {
        Mat::new(&t[self.q_at..], self.q_row, 1)
    }

    /// Its kv head's `[seq, d]` rows of a key-shaped tensor.
    fn kv<'a>(&self, t: &'a [f32]) -> Mat<'a> {
        Mat::new(&t[self.kv_at..], self.kv_row, 1)
    }

    /// `p` = the scaled scores `Q Kᵀ / sqrt(d)` `[seq, seq]` on and below the diagonal (each
    /// block of rows over the positions it sees; what lies past them is left as it was).
    fn scores(&self, q: &[f32], k: &[f32], p: &mut [f32]) {
        let (s, d) = (self.seq, self.d);
        for (i0, i1) in blocks(s) {
            let qb = self.q(q).rows_from(i0);
            product(
                &mut p[i0 * s..],
                s,
                false,
                qb,
                self.kv(k).t(),
                [i1 - i0, i1, d],
                Threads::One,
            );
        }
        let scale = 1.0 / (d as f32).sqrt();
        p.iter_mut().for_each(|x| *x *= scale);
    }

    /// `p` = the causal softmax of the scaled scores, row by row (zero above the diagonal);
    /// each row's log-sum-exp into `lse`.
    fn probabilities(&self, q: &[f32], k: &[f32], p: &mut [f32], mut lse: Option<&mut [f32]>) {
        self.scores(q, k, p);
        let s = self.seq;
        for (i, row) in p.chunks_mut(s).enumerate() {
            let (seen, future) = row.split_at_mut(i + 1);
            future.fill(0.0);
            let l = softmax_in_place(seen);
            if let Some(lse) = lse.as_deref_mut() {
                lse[i] = l;
            }
        }
    }

    /// `p` = the causal softmax again, from the forward's log-sum-exp (the same values).
    fn recompute(&self, q: &[f32], k: &[f32], lse: &[f32], p: &mut [f32]) {
        self.scores(q, k, p);
        let s = self.seq;
        for (i, row) in p.chunks_mut(s).enumerate() {
            let (seen, future) = row.split_at_mut(i + 1);
            future.fill(0.0);
            if lse[i].is_nan() {
                seen.fill(f32::NAN);
            } else {
                exp_shifted(seen, lse[i]);
            }
        }
    }
}

/// Rows per block of the causal products: a block of rows `i0..i1` reads positions `0..i1`.
const BLOCK: usize = 64;

/// The row blocks `(i0, i1)` of a sequence.
fn blocks(seq: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..seq)
        .step_by(BLOCK)
        .map(move |i0| (i0, (i0 + BLOCK).min(seq)))
}

/// Softmax of `row` in place; returns its log-sum-exp. A NaN anywhere makes the row NaN.
fn softmax_in_place(row: &mut [f32]) -> f32 {
    let Some(max) = max_unless_nan(row) else {
        row.fill(f32::NAN);
        return f32::NAN;
    };
    let sum = exp_shifted(row, max);
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(7);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                s as f32 / u32::MAX as f32 - 0.5
            })
            .collect()
    }

    /// Attention by its definition, in f64: `out` and `sum(out * w)` for a fixed `w`.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: &SelfAttentionShape) -> Vec<f64> {
        let d = s.head_dim;
        let mut out = vec![0.0; q.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let g = h / s.groups();
                let qa = |i: usize, c: usize| q[((b * s.seq + i) * s.heads + h) * d + c] as f64;
                let ka = |t: &[f32], j: usize, c: usize| {
                    t[((b * s.seq + j) * s.kv_heads + g) * d + c] as f64
                };
                for i in 0..s.seq {
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..d).map(|c| qa(i, c) * ka(k, j, c)).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let max = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let sum: f64 = sc.iter().map(|x| (x - max).exp()).sum();
                    for c in 0..d {
                        out[((b * s.seq + i) * s.heads + h) * d + c] = (0..=i)
                            .map(|j| (sc[j] - max).exp() / sum * ka(v, j, c))
                            .sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_and_backward_match_the_definition() {
        // One block of rows, and several blocks with a partial last one.
        for (s, stride) in [
            (
                SelfAttentionShape {
                    batch: 2,
                    seq: 13,
                    heads: 4,
                    kv_heads: 2,
                    head_dim: 6,
                },
                7,
            ),
            (
                SelfAttentionShape {
                    batch: 1,
                    seq: 150,
                    heads: 2,
                    kv_heads: 1,
                    head_dim: 4,
                },
                41,
            ),
        ] {
            check_against_definition(&s, stride);
        }
    }

    fn check_against_definition(s: &SelfAttentionShape, stride: usize) {
        let s = *s;
        let (nq, nk) = (
            s.batch * s.seq * s.heads * s.head_dim,
            s.batch * s.seq * s.kv_heads * s.head_dim,
        );
        let (q, k, v) = (values(nq, 1), values(nk, 2), values(nk, 3));
        let w = values(nq, 4);
        let mut out = vec![0.0; nq];
        let mut lse = vec![0.0; s.batch * s.heads * s.seq];
        causal_attention_forward(&q, &k, &v, &s, &mut out, &mut lse);
        let want = reference(&q, &k, &v, &s);
        for (o, r) in out.iter().zip(&want) {
            assert!((*o as f64 - r).abs() < 1e-6, "{o} vs {r}");
        }
        // Gradients of L = sum(out * w) against central differences of the reference.
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
        causal_attention_backward(
            [&q, &k, &v],
            &out,
            &lse,
            &w,
            &s,
            [&mut dq, &mut dk, &mut dv],
        );
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            reference(q, k, v, &s)
                .iter()
                .zip(&w)
                .map(|(o, w)| o * *w as f64)
                .sum()
        };
        let eps = 1e-3f32;
        for which in 0..3 {
            let grad = [&dq, &dk, &dv][which];
            for i in (0..grad.len()).step_by(stride) {
                let mut ins = [q.clone(), k.clone(), v.clone()];
                ins[which][i] += eps;
                let up = loss(&ins[0], &ins[1], &ins[2]);
                ins[which][i] -= 2.0 * eps;
                let down = loss(&ins[0], &ins[1], &ins[2]);
                let numeric = (up - down) / (2.0 * eps as f64);
                assert!(
                    (grad[i] as f64 - numeric).abs() < 1e-4,
                    "input {which}[{i}]: {} vs {numeric}",
                    grad[i]
                );
            }
        }
    }

    #[test]
    fn nan_scores_propagate() {
        let s = SelfAttentionShape {
            batch: 1,
            seq: 4,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
        };
        let mut q = values(32, 5);
        q[4 * 2 * 2] = f32::NAN; // position 2, head 0
        let (k, v) = (values(16, 6), values(16, 7));
        let (mut out, mut lse) = (vec![0.0; 32], vec![0.0; 8]);
        causal_attention_forward(&q, &k, &v, &s, &mut out, &mut lse);
        assert!(out[16..20].iter().all(|x| x.is_nan()), "{out:?}");
        assert!(out[..16].iter().all(|x| x.is_finite()));
    }
}
