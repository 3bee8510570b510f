//! Self-speculative decoding (LayerSkip §5): draft with layers `0..E`, verify with `E..L` in one
//! batched pass over the exit hidden states, accept, roll the single KV cache back by length.
//!
//! Invariant at the start of each step: every layer's cache and the exit-hidden cache hold
//! positions `0..c`, where `c` is the position of the newest token `tokens[c]`, which no layer
//! has seen yet. No layer ever computes the same position twice.

use burn::tensor::{Int, Tensor, TensorData};
use layerskip_model::LayerSkipBackend;

use crate::accept::{Acceptance, accept_greedy, accept_greedy_ids, accept_sampled};
use crate::context::{DecodeContext, Run};
use crate::error::Result;
use crate::options::StreamEvent;

/// Self-speculative decoding with `exit` draft layers and `speculations` drafts per step: the
/// prompt's prefill, then steps until a stop condition.
pub(crate) fn decode<B: LayerSkipBackend>(
    ctx: &mut DecodeContext<'_, B>,
    run: &mut Run,
    (exit, speculations): (usize, usize),
    on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
) -> Result<()> {
    ctx.prefill_for_speculation(run, exit, on_event)?;
    while run.stop.is_none() {
        let step = if run.options.greedy_on_device() {
            ctx.greedy_step(run, exit, speculations)?
        } else {
            ctx.speculative_step(run, exit, speculations)?
        };
        ctx.finish_step(run, step, speculations, on_event);
    }
    Ok(())
}

impl<B: LayerSkipBackend> DecodeContext<'_, B> {
    /// The prompt through the early layers, then the deep layers over its exit hidden states
    /// (the "verification" of the prompt); the last row gives the first token.
    fn prefill_for_speculation(
        &mut self,
        run: &mut Run,
        exit: usize,
        on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
    ) -> Result<()> {
        let layers = self.model.num_layers();
        let prompt = run.tokens.clone();
        let h = self.layers(self.model.embed_ids(&prompt), 0..exit, 0)?;
        self.exits.append(h)?;
        let deep = self.layers(self.exits.since(0), exit..layers, 0)?;
        let n = prompt.len();
        let last = deep.slice([0..1, n - 1..n]);
        let first = if run.options.greedy_on_device() {
            let ids = Self::device_argmax_checked(self.model.exit_head(last));
            self.read_ids(ids)?[0]
        } else {
            let row = self.logit_rows(last)?.remove(0);
            run.choose(row, &prompt).0
        };
        self.emit(run, &[first], on_event);
        Ok(())
    }

    /// Drafts to propose at this step: `speculations`, fewer near the token budget or the end of
    /// the context (each step emits accepted + 1 tokens and needs positions `c..=c + d`).
    pub(crate) fn draft_count(&self, run: &Run, speculations: usize) -> usize {
        let c = run.tokens.len() - 1;
        speculations
            .min(run.budget() - 1)
            .min(self.capacity() - 1 - c)
    }

    /// A greedy step with every choice taken on the device: each draft token stays there as the
    /// next draft's input, and one read brings back the drafts and the verifier's tokens.
    /// Drafting does not stop at a stop token (the host sees the drafts only at the end); the
    /// output is the same, since emitting stops there.
    pub(crate) fn greedy_step(
        &mut self,
        run: &Run,
        exit: usize,
        speculations: usize,
    ) -> Result<Step> {
        let layers = self.model.num_layers();
        let c = run.tokens.len() - 1;
        let d = self.draft_count(run, speculations);
        let mut ids = self.draft_on_device(run, exit, d)?;
        // Verify: layers >= E once over the exit hidden states of positions c..=c+d (causal,
        // offset c), appending the deep layers' K/V.
        let deep = self.layers(self.exits.since(c), exit..layers, c)?;
        ids.push(Self::device_argmax(self.model.exit_head(deep)));
        let ids = self.read_ids(Tensor::cat(ids, 1))?;
        let (drafts, verify) = ids.split_at(d);
        Ok(Step {
            acceptance: accept_greedy_ids(drafts, verify),
            drafts: drafts.to_vec(),
        })
    }

    /// Greedy drafts on the device: `d` tokens through layers `0..exit` from the newest token's
    /// position `c`, each draft the next one's input, then the last draft through the same
    /// layers, every exit hidden state appended (positions `c..=c + d`). Returns the drafts'
    /// ids, still on the device.
    pub(crate) fn draft_on_device(
        &mut self,
        run: &Run,
        exit: usize,
        d: usize,
    ) -> Result<Vec<Tensor<B, 2, Int>>> {
        let c = run.tokens.len() - 1;
        let device = self.model.device();
        let current = TensorData::new(vec![i64::from(run.tokens[c])], [1, 1]);
        let mut input = Tensor::<B, 2, Int>::from_data(current, &device);
        let mut ids = Vec::with_capacity(d + 1);
        for i in 0..d {
            let h = self.layers(self.model.embed(input), 0..exit, c + i)?;
            self.exits.append(h.clone())?;
            input = Self::device_argmax(self.draft_logits(h, &run.options)?);
            ids.push(input.clone());
        }
        let h = self.layers(self.model.embed(input), 0..exit, c + d)?;
        self.exits.append(h)?;
        Ok(ids)
    }

    /// A step with the choices made on the host from logit rows: sampling, history penalties, a
    /// draft-confidence threshold.
    pub(crate) fn speculative_step(
        &mut self,
        run: &mut Run,
        exit: usize,
        speculations: usize,
    ) -> Result<Step> {
        let layers = self.model.num_layers();
        let c = run.tokens.len() - 1;
        let d = self.draft_count(run, speculations);
        // Draft: inputs[i] = tokens[c], drafts[0], ...; input i goes through layers < E at c + i.
        let mut drafts: Vec<u32> = Vec::with_capacity(d);
        let mut q: Vec<Vec<f32>> = Vec::with_capacity(d);
        let mut history = run.tokens.clone();
        let mut input = run.tokens[c];
        for i in 0..d {
            let h = self.layers(self.model.embed_ids(&[input]), 0..exit, c + i)?;
            self.exits.append(h.clone())?;
            let row = self.draft_logit_row(h, &run.options)?;
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
        let rows = self.logit_rows(deep)?;
        let p: Vec<Vec<f32>> = rows
            .into_iter()
            .enumerate()
            .map(|(i, row)| run.distribution(row, &history[..c + 1 + i]))
            .collect();
        let acceptance = if run.options.sampling.is_greedy() {
            accept_greedy(&drafts, &p)
        } else {
            accept_sampled(&drafts, &q, &p, &mut run.rng)
        };
        Ok(Step { acceptance, drafts })
    }

    /// Rolls the caches back to the accepted positions, counts, and emits the accepted drafts and
    /// the verifier's next token.
    pub(crate) fn finish_step(
        &mut self,
        run: &mut Run,
        Step { acceptance, drafts }: Step,
        speculations: usize,
        on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
    ) {
        let Acceptance { accepted, next } = acceptance;
        // Positions c..=c+accepted hold tokens[c] and the accepted drafts.
        let keep = run.tokens.len() + accepted;
        self.cache.truncate(keep);
        self.exits.truncate(keep);
        self.stats.steps += 1;
        self.stats.drafted += drafts.len();
        self.stats.accepted += accepted;
        if self.stats.accepted_histogram.len() <= speculations {
            self.stats.accepted_histogram.resize(speculations + 1, 0);
        }
        self.stats.accepted_histogram[accepted] += 1;
        if accepted < drafts.len() {
            on_event(StreamEvent::Rejected(&drafts[accepted..]));
        }
        let mut new = drafts[..accepted].to_vec();
        new.push(next);
        self.emit(run, &new, on_event);
    }
}

/// The drafts of one step and what the verifier made of them.
pub(crate) struct Step {
    pub(crate) acceptance: Acceptance,
    pub(crate) drafts: Vec<u32>,
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
