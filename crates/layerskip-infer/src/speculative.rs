//! Self-speculative decoding (LayerSkip §5): draft with layers `0..E`, verify with `E..L` in one
//! batched pass over the exit hidden states, accept, roll the single KV cache back by length.
//!
//! Invariant at the start of each step: every layer's cache and the exit-hidden cache hold
//! positions `0..c`, where `c` is the position of the newest token `tokens[c]`, which no layer
//! has seen yet. No layer ever computes the same position twice.

use layerskip_model::LayerSkipBackend;

use crate::accept::{Acceptance, accept_greedy, accept_sampled};
use crate::error::Result;
use crate::generator::{Generator, Run, StreamEvent};

impl<B: LayerSkipBackend> Generator<'_, B> {
    pub(crate) fn self_speculate(
        &mut self,
        run: &mut Run<'_>,
        exit: usize,
        speculations: usize,
        on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
    ) -> Result<()> {
        let layers = self.model.num_layers();
        // Prefill: the prompt through the early layers, then the deep layers over its exit
        // hidden states (the "verification" of the prompt); the last row gives the first token.
        let prompt = run.tokens.clone();
        let h = self.layers(self.model.embed_ids(&prompt), 0..exit, 0)?;
        self.exits.append(h)?;
        let deep = self.layers(self.exits.since(0), exit..layers, 0)?;
        let n = prompt.len();
        let last = self.logit_rows(deep.slice([0..1, n - 1..n])).remove(0);
        let (first, _) = run.choose(last, &prompt);
        self.emit(run, &[first], on_event);
        while run.stop.is_none() {
            self.speculative_step(run, exit, speculations, on_event)?;
        }
        Ok(())
    }

    fn speculative_step(
        &mut self,
        run: &mut Run<'_>,
        exit: usize,
        speculations: usize,
        on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
    ) -> Result<()> {
        let layers = self.model.num_layers();
        let c = run.tokens.len() - 1;
        // Each step emits accepted + 1 tokens and needs positions c..=c+d in the cache.
        let d = speculations
            .min(run.budget() - 1)
            .min(self.capacity() - 1 - c);
        // Draft: inputs[i] = tokens[c], drafts[0], ...; input i goes through layers < E at c + i.
        let mut drafts: Vec<u32> = Vec::with_capacity(d);
        let mut q: Vec<Vec<f32>> = Vec::with_capacity(d);
        let mut history = run.tokens.clone();
        let mut input = run.tokens[c];
        for i in 0..d {
            let h = self.layers(self.model.embed_ids(&[input]), 0..exit, c + i)?;
            self.exits.append(h.clone())?;
            let row = self.draft_logit_row(h, run.options)?;
            let (token, dist) = run.choose(row, &history);
            let unsure = run.options.draft_confidence.is_some_and(|t| {
                draft_probability(&dist, token, run.options.sampling.is_greedy()) < t
            });
            drafts.push(token);
            q.push(dist);
            history.push(token);
            input = token;
            if unsure || run.options.stop_tokens.contains(&token) {
                break;
            }
        }
        // Verify: the last input through layers < E, then layers >= E once over the exit hidden
        // states of positions c..=c+n (causal, offset c), appending the deep layers' K/V.
        let n = drafts.len();
        let h = self.layers(self.model.embed_ids(&[input]), 0..exit, c + n)?;
        self.exits.append(h)?;
        let deep = self.layers(self.exits.since(c), exit..layers, c)?;
        let rows = self.logit_rows(deep);
        let p: Vec<Vec<f32>> = rows
            .into_iter()
            .enumerate()
            .map(|(i, row)| run.distribution(row, &history[..c + 1 + i]))
            .collect();
        let Acceptance { accepted, next } = if run.options.sampling.is_greedy() {
            accept_greedy(&drafts, &p)
        } else {
            accept_sampled(&drafts, &q, &p, &mut run.rng)
        };
        // Roll back: positions c..=c+accepted hold tokens[c] and the accepted drafts.
        self.cache.truncate(c + accepted + 1);
        self.exits.truncate(c + accepted + 1);
        self.stats.steps += 1;
        self.stats.drafted += n;
        self.stats.accepted += accepted;
        if self.stats.accepted_histogram.len() <= speculations {
            self.stats.accepted_histogram.resize(speculations + 1, 0);
        }
        self.stats.accepted_histogram[accepted] += 1;
        if accepted < n {
            on_event(StreamEvent::Rejected(&drafts[accepted..]));
        }
        let mut new = drafts[..accepted].to_vec();
        new.push(next);
        self.emit(run, &new, on_event);
        Ok(())
    }
}

/// The probability of the drafted `token` under the draft distribution: `dist` holds
/// probabilities when sampling, logits (after penalties) when greedy (then `token` is their
/// argmax and its probability is `1 / sum_i exp(l_i - l_token)`).
fn draft_probability(dist: &[f32], token: u32, greedy: bool) -> f32 {
    let chosen = dist[token as usize];
    if !greedy {
        return chosen;
    }
    let z: f32 = dist
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| (l - chosen).exp())
        .sum();
    1.0 / z
}

#[cfg(test)]
mod tests {
    use super::draft_probability;

    /// Greedy: the softmax probability of the argmax, by hand; sampled: the entry itself.
    #[test]
    fn draft_probability_is_the_chosen_tokens_softmax_probability() {
        // softmax([2, 0, ln 2, -inf]) at 0: e^2 / (e^2 + 1 + 2).
        let logits = [2.0, 0.0, 2f32.ln(), f32::NEG_INFINITY];
        let want = 2f32.exp() / (2f32.exp() + 3.0);
        assert!((draft_probability(&logits, 0, true) - want).abs() < 1e-6);
        assert_eq!(draft_probability(&[0.1, 0.7, 0.2], 1, false), 0.7);
    }
}
