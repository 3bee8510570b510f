//! Causal grouped-query attention of new query rows over a KV cache buffer, on plain slices:
//! query head `h` reads kv head `h / groups` in place, with no gathered copy of the cache.
//!
//! Each query row is computed alone, in the same order whatever the number of rows, so a
//! position's output does not depend on how many rows share the call (self-speculative
//! verification reproduces one-token decoding bit for bit).

use crate::cpu::exp256;

/// Attention of `q` `[batch, seq, heads, d]` (rotated) against the first `len` positions of the
/// cache buffers `k`, `v` `[batch, kv_heads, capacity, d]` (the `seq` new positions written
/// last), into `out` `[batch, seq, heads * d]`: AVX2 and FMA when the CPU has them.
pub fn attend(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], shape: &AttendShape) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        unsafe { attend_avx2(q, k, v, out, shape) };
        return;
    }
    attend_rows(q, k, v, out, shape);
}

/// The dimensions of an [`attend`] call.
pub struct AttendShape {
    /// Sequences.
    pub batch: usize,
    /// New query rows per sequence.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Positions each cache buffer holds.
    pub capacity: usize,
    /// Head dim.
    pub d: usize,
    /// Positions held, the new ones included.
    pub len: usize,
    /// Query heads per kv head.
    pub groups: usize,
}

impl AttendShape {
    /// Every (query row, head) of the call, in order: the number of keys it sees, the offset of
    /// its kv head's buffer in the cache and the offset of its query (and output) row.
    fn rows(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let (batch, seq, heads) = (self.batch, self.seq, self.heads);
        (0..batch).flat_map(move |b| {
            (0..seq).flat_map(move |t| {
                (0..heads).map(move |h| {
                    let visible = self.len - seq + t + 1;
                    let base = (b * self.kv_heads + h / self.groups) * self.capacity * self.d;
                    (visible, base, ((b * seq + t) * heads + h) * self.d)
                })
            })
        })
    }
}

/// The attention kernel with AVX2 and FMA for head dims of 8 to 128 in whole vectors, else
/// [`attend_rows`]. Per query row and head: scores four keys at a time (each key's dot product
/// its own chain of FMAs over 8-lane vectors, reduced pairwise), a vectorised exp, and the
/// weighted sum of values in registers. Each key's arithmetic and every sum's order depend only
/// on the number of visible keys, never on which other rows share the call.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], shape: &AttendShape) {
    // SAFETY: the CPU has AVX2 and FMA (the caller's promise); the shapes are the caller's.
    unsafe {
        match (shape.d % 8, shape.d / 8) {
            (0, 1) => attend_lanes::<1>(q, k, v, out, shape),
            (0, 2) => attend_lanes::<2>(q, k, v, out, shape),
            (0, 4) => attend_lanes::<4>(q, k, v, out, shape),
            (0, 6) => attend_lanes::<6>(q, k, v, out, shape),
            (0, 8) => attend_lanes::<8>(q, k, v, out, shape),
            (0, 10) => attend_lanes::<10>(q, k, v, out, shape),
            (0, 12) => attend_lanes::<12>(q, k, v, out, shape),
            (0, 16) => attend_lanes::<16>(q, k, v, out, shape),
            _ => attend_rows(q, k, v, out, shape),
        }
    }
}

/// [`attend_avx2`] for head dim `8 * L`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `shape.d == 8 * L`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_lanes<const L: usize>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    shape: &AttendShape,
) {
    use std::arch::x86_64::*;
    let d = shape.d;
    let scale = _mm_set1_ps((1.0 / (d as f64).sqrt()) as f32);
    // Scores, padded to whole vectors.
    let mut weights = vec![0.0f32; shape.len.div_ceil(8) * 8];
    // SAFETY: every offset stays inside the buffers' shapes (`visible <= len <= capacity`).
    unsafe {
        for (visible, base, at) in shape.rows() {
            let (kh, vh) = (k.as_ptr().add(base), v.as_ptr().add(base));
            let qr = q.as_ptr().add(at);
            let mut qv = [_mm256_setzero_ps(); L];
            for (l, x) in qv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(qr.add(l * 8));
            }
            let dot = |j: usize| {
                // Keys past `visible` repeat the last one; their scores are not read.
                let kr = kh.add(j.min(visible - 1) * d);
                let mut acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kr));
                for (l, x) in qv.iter().enumerate().skip(1) {
                    acc = _mm256_fmadd_ps(*x, _mm256_loadu_ps(kr.add(l * 8)), acc);
                }
                acc
            };
            let mut vmax = _mm_set1_ps(f32::NEG_INFINITY);
            // Lanes whose score is NaN or infinite: `max` and the exp's clamp would turn them
            // into finite weights, so such a row's output is NaN, as the softmax's definition
            // gives it.
            let mut bad = _mm_setzero_ps();
            let mut j = 0;
            while j < visible {
                let (a0, a1, a2, a3) = (dot(j), dot(j + 1), dot(j + 2), dot(j + 3));
                let sums = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
                let four = _mm_mul_ps(
                    _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1)),
                    scale,
                );
                _mm_storeu_ps(weights.as_mut_ptr().add(j), four);
                vmax = _mm_max_ps(vmax, four);
                let zero = _mm_sub_ps(four, four);
                bad = _mm_or_ps(bad, _mm_cmpunord_ps(zero, zero));
                j += 4;
            }
            if _mm_movemask_ps(bad) != 0 {
                std::slice::from_raw_parts_mut(out.as_mut_ptr().add(at), d).fill(f32::NAN);
                continue;
            }
            // The padding repeats the last key's score, so it cannot raise the max.
            let vmax = _mm_max_ps(vmax, _mm_movehl_ps(vmax, vmax));
            let vmax = _mm_max_ss(vmax, _mm_shuffle_ps(vmax, vmax, 1));
            let vmax = _mm256_set1_ps(_mm_cvtss_f32(vmax));
            let mut vsum = _mm256_setzero_ps();
            let mut j = 0;
            while j < visible {
                let w = weights.as_mut_ptr().add(j);
                let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(w), vmax));
                // Lanes past `visible` count as zero.
                let live = _mm256_cmp_ps(
                    _mm256_set_ps(7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0),
                    _mm256_set1_ps((visible - j) as f32),
                    _CMP_LT_OQ,
                );
                let e = _mm256_and_ps(e, live);
                _mm256_storeu_ps(w, e);
                vsum = _mm256_add_ps(vsum, e);
                j += 8;
            }
            let hi = _mm256_extractf128_ps(vsum, 1);
            let lo = _mm256_castps256_ps128(vsum);
            // ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
            let pairs = _mm_hadd_ps(lo, hi);
            let quads = _mm_hadd_ps(pairs, pairs);
            let sum = _mm_cvtss_f32(_mm_add_ss(quads, _mm_movehdup_ps(quads)));
            let mut acc = [_mm256_setzero_ps(); L];
            for (j, &w) in weights[..visible].iter().enumerate() {
                let (wv, vr) = (_mm256_set1_ps(w), vh.add(j * d));
                for (l, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(vr.add(l * 8)), *a);
                }
            }
            let inv = _mm256_set1_ps(1.0 / sum);
            let or = out.as_mut_ptr().add(at);
            for (l, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(or.add(l * 8), _mm256_mul_ps(*a, inv));
            }
        }
    }
}

/// The attention kernel: per query row and head, scaled dot products with every visible key,
/// a max-subtracted softmax, and the weighted sum of values.
#[inline(always)]
fn attend_rows(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], shape: &AttendShape) {
    let d = shape.d;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let mut weights = vec![0.0f32; shape.len];
    for (visible, base, at) in shape.rows() {
        let (kh, vh) = (&k[base..base + visible * d], &v[base..base + visible * d]);
        let qr = &q[at..at + d];
        let mut max = f32::NEG_INFINITY;
        for (w, kr) in weights.iter_mut().zip(kh.chunks_exact(d)) {
            *w = dot8(qr, kr) * scale;
            max = max.max(*w);
        }
        let mut sum = 0.0f32;
        for w in &mut weights[..visible] {
            *w = (*w - max).exp();
            sum += *w;
        }
        let or = &mut out[at..at + d];
        or.fill(0.0);
        for (&w, vr) in weights.iter().zip(vh.chunks_exact(d)) {
            for (o, &x) in or.iter_mut().zip(vr) {
                *o += w * x;
            }
        }
        let inv = 1.0 / sum;
        for o in or.iter_mut() {
            *o *= inv;
        }
    }
}

/// A dot product as eight lane sums over features `i ≡ lane (mod 8)`, summed pairwise, then
/// the tail: a fixed order that vectorises.
#[inline(always)]
fn dot8(x: &[f32], y: &[f32]) -> f32 {
    let body = x.len() / 8 * 8;
    let mut lanes = [0.0f32; 8];
    for (xc, yc) in x[..body].chunks_exact(8).zip(y[..body].chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += xc[l] * yc[l];
        }
    }
    let mut s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for i in body..x.len() {
        s += x[i] * y[i];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + seed as f32) * 0.618).sin())
            .collect()
    }

    /// The softmax attention of each (row, head) in f64, NaN where a score is not finite.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: &AttendShape) -> Vec<f64> {
        let mut out = vec![0f64; q.len()];
        for (visible, base, at) in s.rows() {
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    (0..s.d)
                        .map(|c| f64::from(q[at + c]) * f64::from(k[base + j * s.d + c]))
                        .sum::<f64>()
                        / (s.d as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let bad = scores.iter().any(|x| !x.is_finite());
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..s.d {
                let o = (0..visible)
                    .map(|j| e[j] * f64::from(v[base + j * s.d + c]))
                    .sum::<f64>()
                    / sum;
                out[at + c] = if bad { f64::NAN } else { o };
            }
        }
        out
    }

    /// The kernel against the definition, and a NaN or infinity in a query or a key turning the
    /// rows that read it into NaN (not into a finite softmax over the other keys).
    #[test]
    fn matches_the_softmax_and_propagates_non_finite_scores() {
        let s = AttendShape {
            batch: 1,
            seq: 2,
            heads: 4,
            kv_heads: 2,
            capacity: 16,
            d: 32,
            len: 11,
            groups: 2,
        };
        let (q, k, v) = (
            values(2 * 4 * 32, 1),
            values(2 * 16 * 32, 2),
            values(2 * 16 * 32, 3),
        );
        // (what, in the query or the keys, at index, value)
        let cases = [
            ("finite", false, 0, 0.0),
            ("NaN in head 1's query", false, 32 + 5, f32::NAN),
            ("NaN in kv head 1, key 3", true, (16 + 3) * 32 + 7, f32::NAN),
            ("inf in kv head 0, key 9", true, 9 * 32, f32::INFINITY),
        ];
        for (name, in_keys, at, value) in cases {
            let (mut q, mut k) = (q.clone(), k.clone());
            if name != "finite" {
                if in_keys {
                    k[at] = value
                } else {
                    q[at] = value
                }
            }
            let want = reference(&q, &k, &v, &s);
            let mut out = vec![0f32; q.len()];
            attend(&q, &k, &v, &mut out, &s);
            for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                if w.is_nan() {
                    assert!(g.is_nan(), "{name}: [{i}] {g}, want NaN");
                } else {
                    assert!((f64::from(*g) - w).abs() < 1e-5, "{name}: [{i}] {g} vs {w}");
                }
            }
            assert!(name == "finite" || want.iter().any(|w| w.is_nan()));
        }
    }
}
