//! Output-quality metrics of `layerskip bench`: ROUGE-1/2/L F1 (as Google's `rouge-score`:
//! lowercase, non-alphanumerics split words, no stemming), corpus BLEU-4 (as `sacrebleu`'s
//! formula: clipped n-gram precisions pooled over the corpus, geometric mean, brevity penalty;
//! whitespace tokens, no smoothing), exact match, and token agreement with a baseline output.

use std::collections::HashMap;

/// Words as `rouge-score` tokenises them: lowercase ASCII letters and digits, everything else
/// separates words.
pub fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

fn ngram_counts<T: AsRef<str>>(words: &[T], n: usize) -> HashMap<Vec<&str>, usize> {
    let mut counts = HashMap::new();
    if n > 0 && words.len() >= n {
        for w in words.windows(n) {
            *counts
                .entry(w.iter().map(AsRef::as_ref).collect())
                .or_insert(0) += 1;
        }
    }
    counts
}

/// Clipped matches of candidate n-grams in the reference, candidate n-grams, reference n-grams.
fn ngram_overlap<T: AsRef<str>>(candidate: &[T], reference: &[T], n: usize) -> [usize; 3] {
    let (c, r) = (ngram_counts(candidate, n), ngram_counts(reference, n));
    let matches = c
        .iter()
        .map(|(g, &k)| k.min(r.get(g).copied().unwrap_or(0)))
        .sum();
    [matches, c.values().sum(), r.values().sum()]
}

fn f1(matches: usize, candidate: usize, reference: usize) -> f64 {
    if matches == 0 || candidate == 0 || reference == 0 {
        return 0.0;
    }
    let (p, r) = (
        matches as f64 / candidate as f64,
        matches as f64 / reference as f64,
    );
    2.0 * p * r / (p + r)
}

/// ROUGE-N F1 of `candidate` against `reference`.
pub fn rouge_n(candidate: &str, reference: &str, n: usize) -> f64 {
    let [m, c, r] = ngram_overlap(&rouge_tokens(candidate), &rouge_tokens(reference), n);
    f1(m, c, r)
}

/// Length of the longest common subsequence.
fn lcs<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diagonal = 0;
        for (j, y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y {
                diagonal + 1
            } else {
                above.max(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// ROUGE-L F1 (longest common subsequence of words).
pub fn rouge_l(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (rouge_tokens(candidate), rouge_tokens(reference));
    f1(lcs(&c, &r), c.len(), r.len())
}

/// Corpus BLEU-4 accumulated over (candidate, reference) pairs.
#[derive(Debug, Clone, Default)]
pub struct Bleu {
    matches: [usize; 4],
    totals: [usize; 4],
    candidate_len: usize,
    reference_len: usize,
}

impl Bleu {
    /// Adds one pair (whitespace-separated tokens, case kept).
    pub fn add(&mut self, candidate: &str, reference: &str) {
        let c: Vec<&str> = candidate.split_whitespace().collect();
        let r: Vec<&str> = reference.split_whitespace().collect();
        for n in 1..=4 {
            let [m, total, _] = ngram_overlap(&c, &r, n);
            self.matches[n - 1] += m;
            self.totals[n - 1] += total;
        }
        self.candidate_len += c.len();
        self.reference_len += r.len();
    }

    /// BLEU in `[0, 1]`: `BP * exp(mean_n log p_n)`, 0 when any n-gram order has no match.
    pub fn score(&self) -> f64 {
        if self.candidate_len == 0 || self.matches.contains(&0) {
            return 0.0;
        }
        let log_p: f64 = (0..4)
            .map(|i| (self.matches[i] as f64 / self.totals[i] as f64).ln())
            .sum::<f64>()
            / 4.0;
        let (c, r) = (self.candidate_len as f64, self.reference_len as f64);
        let brevity = if c >= r { 1.0 } else { (1.0 - r / c).exp() };
        brevity * log_p.exp()
    }
}

/// BLEU-4 of one pair.
pub fn bleu4(candidate: &str, reference: &str) -> f64 {
    let mut b = Bleu::default();
    b.add(candidate, reference);
    b.score()
}

/// 1 when the texts are equal up to surrounding whitespace, else 0.
pub fn exact_match(candidate: &str, reference: &str) -> f64 {
    f64::from(u8::from(candidate.trim() == reference.trim()))
}

/// Fraction of positions at which two token sequences agree, over the longer length (1 for two
/// empty sequences): how closely a strategy reproduces the baseline's output.
pub fn token_agreement(a: &[u32], b: &[u32]) -> f64 {
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 1.0;
    }
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / longest as f64
}

/// Index of the first position where two token sequences differ, `None` when equal.
pub fn first_difference(a: &[u32], b: &[u32]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() == b.len() => None,
        None => Some(a.len().min(b.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    #[test]
    fn rouge_by_hand() {
        // Candidate words: the cat sat on the mat (6); reference: the cat is on the mat (6).
        // Unigrams: matches the x2, cat, on, mat = 5 -> P = R = 5/6.
        close(
            rouge_n("The cat sat on the mat.", "the cat is on the mat", 1),
            5.0 / 6.0,
        );
        // Bigrams: candidate {the cat, cat sat, sat on, on the, the mat}, reference {the cat,
        // cat is, is on, on the, the mat}: 3 matches of 5 and 5.
        close(
            rouge_n("The cat sat on the mat.", "the cat is on the mat", 2),
            0.6,
        );
        // LCS: the cat on the mat = 5 -> F1 = 5/6.
        close(
            rouge_l("The cat sat on the mat.", "the cat is on the mat"),
            5.0 / 6.0,
        );
        // Different lengths: candidate "a b c d", reference "a c": LCS 2, P = 1/2, R = 1 -> 2/3.
        close(rouge_l("a b c d", "a c"), 2.0 / 3.0);
        // Clipping: "the the the" vs "the": 1 match; P = 1/3, R = 1 -> F1 = 0.5.
        close(rouge_n("the the the", "the", 1), 0.5);
        close(rouge_n("", "the", 1), 0.0);
        assert_eq!(rouge_tokens("def f(x_1):"), vec!["def", "f", "x", "1"]);
    }

    #[test]
    fn bleu_by_hand() {
        close(bleu4("a b c d e", "a b c d e"), 1.0);
        // Candidate "a b c d e f" vs reference "a b c d e g": p1 = 5/6, p2 = 4/5, p3 = 3/4,
        // p4 = 2/3, equal lengths -> BP 1; BLEU = (5/6 * 4/5 * 3/4 * 2/3)^(1/4) = (1/3)^(1/4).
        close(
            bleu4("a b c d e f", "a b c d e g"),
            (1.0f64 / 3.0).powf(0.25),
        );
        // Short candidate "a b c d" vs "a b c d e f": all p_n = 1, BP = exp(1 - 6/4).
        close(bleu4("a b c d", "a b c d e f"), (1.0f64 - 1.5).exp());
        // No 4-gram match -> 0 (no smoothing).
        close(bleu4("a b c x", "a b c d"), 0.0);
        // Corpus pooling differs from averaging sentences: the second pair alone scores 0.
        let mut corpus = Bleu::default();
        corpus.add("a b c d e", "a b c d e");
        corpus.add("x y", "x z");
        // p1 = 6/7, p2 = 4/5, p3 = 3/3, p4 = 2/2; lengths 7 = 7.
        close(corpus.score(), (6.0f64 / 7.0 * 4.0 / 5.0).powf(0.25));
    }

    #[test]
    fn agreement_and_differences() {
        close(token_agreement(&[1, 2, 3], &[1, 2, 3]), 1.0);
        close(token_agreement(&[1, 2, 3, 4], &[1, 9, 3]), 0.5);
        close(token_agreement(&[], &[]), 1.0);
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_difference(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(first_difference(&[1, 2], &[1, 2, 3]), Some(2));
        close(exact_match(" x = 1\n", "x = 1"), 1.0);
        close(exact_match("x = 2", "x = 1"), 0.0);
    }
}
