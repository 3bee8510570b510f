//! Accepting drafted tokens against the verifier: pure functions, tested on their own.

use rand::Rng;

use crate::sampling::{argmax, sample};

/// The outcome of verifying one batch of drafts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acceptance {
    /// How many drafts were accepted (a prefix of the drafts).
    pub accepted: usize,
    /// The verifier's token after the accepted prefix: a correction where a draft was rejected,
    /// or the bonus token when every draft was accepted.
    pub next: u32,
}

/// Greedy acceptance: the longest prefix where `drafts[i] == argmax(verify[i])`, then the
/// verifier's argmax at the first mismatch (or after the last draft).
///
/// `verify` holds `drafts.len() + 1` logit rows: row `i` predicts the token after draft `i - 1`.
pub fn accept_greedy(drafts: &[u32], verify: &[Vec<f32>]) -> Acceptance {
    assert_eq!(
        verify.len(),
        drafts.len() + 1,
        "one verifier row per draft plus the bonus row"
    );
    let mut accepted = 0;
    while accepted < drafts.len() && argmax(&verify[accepted]) == drafts[accepted] {
        accepted += 1;
    }
    Acceptance {
        accepted,
        next: argmax(&verify[accepted]),
    }
}

/// [`accept_greedy`] given the verifier's greedy tokens (`verify[i]` = the argmax of its row
/// `i`, `drafts.len() + 1` of them) instead of its logit rows: what a device that takes the
/// argmax itself hands back.
pub fn accept_greedy_ids(drafts: &[u32], verify: &[u32]) -> Acceptance {
    assert_eq!(
        verify.len(),
        drafts.len() + 1,
        "one verifier token per draft plus the bonus token"
    );
    let accepted = drafts
        .iter()
        .zip(verify)
        .take_while(|(d, v)| d == v)
        .count();
    Acceptance {
        accepted,
        next: verify[accepted],
    }
}

/// Speculative sampling (Leviathan et al.; Chen et al.): accept draft `x_i` with probability
/// `min(1, p_i(x_i) / q_i(x_i))`; at the first rejection draw from `normalise(max(0, p_i - q_i))`
/// and stop; if all pass, draw the bonus token from `p_d`. The output is distributed exactly as
/// sampling from `p` alone.
///
/// `q[i]` is the draft distribution of draft `i`; `p` holds `drafts.len() + 1` verifier
/// distributions (after the same temperature / top-k / top-p processing).
pub fn accept_sampled(
    drafts: &[u32],
    q: &[Vec<f32>],
    p: &[Vec<f32>],
    rng: &mut impl Rng,
) -> Acceptance {
    assert_eq!(q.len(), drafts.len());
    assert_eq!(p.len(), drafts.len() + 1);
    for (i, &x) in drafts.iter().enumerate() {
        let (px, qx) = (p[i][x as usize], q[i][x as usize]);
        // qx > 0 always holds for a token drawn from q; guard anyway.
        let ratio = if qx > 0.0 { (px / qx).min(1.0) } else { 0.0 };
        if rng.random::<f32>() >= ratio {
            let residual: Vec<f32> = p[i]
                .iter()
                .zip(&q[i])
                .map(|(a, b)| (a - b).max(0.0))
                .collect();
            // When p == q numerically the residual is empty; then p itself is the right law.
            let next = if residual.iter().any(|&r| r > 0.0) {
                sample(&residual, rng)
            } else {
                sample(&p[i], rng)
            };
            return Acceptance { accepted: i, next };
        }
    }
    Acceptance {
        accepted: drafts.len(),
        next: sample(&p[drafts.len()], rng),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn one_hot(i: usize) -> Vec<f32> {
        let mut v = vec![0.0; 4];
        v[i] = 1.0;
        v
    }

    /// Acceptance from the verifier's tokens equals acceptance from its logit rows, for every
    /// draft sequence over a small vocabulary against fixed random rows.
    #[test]
    fn acceptance_from_token_ids_equals_acceptance_from_logit_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for d in 0..4 {
            let rows: Vec<Vec<f32>> = (0..=d)
                .map(|_| (0..3).map(|_| rng.random::<f32>()).collect())
                .collect();
            let ids: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
            for code in 0..3usize.pow(d as u32) {
                let drafts: Vec<u32> = (0..d)
                    .map(|i| (code / 3usize.pow(i as u32) % 3) as u32)
                    .collect();
                assert_eq!(
                    accept_greedy_ids(&drafts, &ids),
                    accept_greedy(&drafts, &rows),
                    "{drafts:?}"
                );
            }
        }
    }

    #[test]
    fn greedy_accepts_the_longest_matching_prefix() {
        let verify = vec![one_hot(1), one_hot(2), one_hot(0), one_hot(3)];
        assert_eq!(
            accept_greedy(&[1, 2, 3], &verify),
            Acceptance {
                accepted: 2,
                next: 0
            }
        );
        assert_eq!(
            accept_greedy(&[0, 2, 3], &verify),
            Acceptance {
                accepted: 0,
                next: 1
            }
        );
        assert_eq!(
            accept_greedy(&[1, 2, 0], &verify),
            Acceptance {
                accepted: 3,
                next: 3
            }
        );
        assert_eq!(
            accept_greedy(&[], &verify[..1]),
            Acceptance {
                accepted: 0,
                next: 1
            }
        );
    }

    /// The first emitted token of speculative sampling is distributed as p, whatever q is: a
    /// rule that, say, accepted with p/q unclipped or resampled from p instead of the residual
    /// fails this at these sample sizes.
    #[test]
    fn first_token_follows_the_target_distribution() {
        let p = vec![0.5, 0.3, 0.15, 0.05];
        let q = vec![0.1, 0.2, 0.3, 0.4];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut counts = [0usize; 4];
        let n = 40_000;
        for _ in 0..n {
            let draft = sample(&q, &mut rng);
            let a = accept_sampled(
                &[draft],
                std::slice::from_ref(&q),
                &[p.clone(), p.clone()],
                &mut rng,
            );
            let first = if a.accepted == 1 { draft } else { a.next };
            counts[first as usize] += 1;
        }
        // Chi-square with 3 degrees of freedom: 16.3 is the 0.999 quantile.
        let chi2: f64 = counts
            .iter()
            .zip(&p)
            .map(|(&c, &pi)| {
                let e = n as f64 * pi as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 16.3, "chi2 {chi2}, counts {counts:?}");
    }

    #[test]
    fn identical_distributions_accept_everything() {
        let p = vec![0.25; 4];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..100 {
            let a = accept_sampled(
                &[1, 2],
                &[p.clone(), p.clone()],
                &[p.clone(), p.clone(), p.clone()],
                &mut rng,
            );
            assert_eq!(a.accepted, 2);
        }
    }
}
