//! Self-speculative decoding (LayerSkip §5): draft with layers `0..E`, verify with `E..L` in one
//! batched pass over the exit hidden states, accept, roll the single KV cache back by length.
//!
//! Invariant at the start of each step: every layer's cache and the exit-hidden cache hold
//! positions `0..c`, where `c` is the position of the newest token `tokens[c]`, which no layer
//! has seen yet. No layer ever computes the same position twice.

use burn::tensor::Tensor;
use layerskip_model::LayerSkipBackend;

use crate::accept::{accept_greedy, accept_greedy_ids};
use crate::context::{DecodeContext, Run, Step};
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
    prefill(ctx, run, exit, on_event)?;
    while run.is_running() {
        let step = if run.greedy_on_device() {
            greedy_step(ctx, run, exit, speculations)?
        } else {
            sampled_step(ctx, run, exit, speculations)?
        };
        ctx.accept(run, step, (exit, speculations), on_event);
    }
    Ok(())
}

/// The prompt drafted and verified as one step: through the early layers, then the deep layers
/// over its exit hidden states; the last row gives the first token.
fn prefill<B: LayerSkipBackend>(
    ctx: &mut DecodeContext<'_, B>,
    run: &mut Run,
    exit: usize,
    on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
) -> Result<()> {
    let n = run.tokens().len();
    ctx.draft_layers(ctx.model().embed_ids(run.tokens()), exit, 0)?;
    let deep = ctx.verify(exit, 0)?;
    let first = ctx.next_token(run, deep.slice([0..1, n - 1..n]), true)?;
    ctx.emit(run, &[first], on_event);
    Ok(())
}

/// A greedy step with every choice taken on the device: each draft token stays there as the
/// next draft's input, and one read brings back the drafts and the verifier's tokens.
/// Drafting does not stop at a stop token (the host sees the drafts only at the end); the
/// output is the same, since emitting stops there.
pub(crate) fn greedy_step<B: LayerSkipBackend>(
    ctx: &mut DecodeContext<'_, B>,
    run: &Run,
    exit: usize,
    speculations: usize,
) -> Result<Step> {
    let d = ctx.draft_count(run, speculations);
    let mut ids = ctx.draft_on_device(run, exit, d)?;
    let deep = ctx.verify(exit, run.newest())?;
    ids.push(DecodeContext::device_argmax(ctx.model().exit_head(deep)));
    let ids = ctx.read_ids(Tensor::cat(ids, 1))?;
    let (drafts, verify) = ids.split_at(d);
    Ok(Step {
        acceptance: accept_greedy_ids(drafts, verify),
        drafts: drafts.to_vec(),
    })
}

/// A step with the choices made on the host from logit rows: sampling, history penalties, a
/// draft-confidence threshold.
pub(crate) fn sampled_step<B: LayerSkipBackend>(
    ctx: &mut DecodeContext<'_, B>,
    run: &mut Run,
    exit: usize,
    speculations: usize,
) -> Result<Step> {
    let c = run.newest();
    let d = ctx.draft_count(run, speculations);
    // Draft: inputs[i] = tokens[c], drafts[0], ...; input i goes through layers < E at c + i.
    let mut drafts: Vec<u32> = Vec::with_capacity(d);
    let mut q: Vec<Vec<f32>> = Vec::with_capacity(d);
    let mut history = run.tokens().to_vec();
    let mut input = history[c];
    let options = run.options().clone();
    for i in 0..d {
        let h = ctx.draft_layers(ctx.model().embed_ids(&[input]), exit, c + i)?;
        let row = ctx.draft_logit_row(h, &options)?;
        let (token, dist) = run.choose(row, &history);
        let unsure = options
            .draft_confidence
            .is_some_and(|t| draft_probability(&dist, token, options.sampling.is_greedy()) < t);
        drafts.push(token);
        q.push(dist);
        history.push(token);
        input = token;
        if unsure || options.stop_tokens.contains(&token) {
            break;
        }
    }
    // Verify: the last input through layers < E, then the deep layers over c..=c+n.
    let n = drafts.len();
    ctx.draft_layers(ctx.model().embed_ids(&[input]), exit, c + n)?;
    let deep = ctx.verify(exit, c)?;
    let p: Vec<Vec<f32>> = ctx
        .logit_rows(deep)?
        .into_iter()
        .enumerate()
        .map(|(i, row)| run.distribution(row, &history[..c + 1 + i]))
        .collect();
    let acceptance = if options.sampling.is_greedy() {
        accept_greedy(&drafts, &p)
    } else {
        run.accept_sampled(&drafts, &q, &p)
    };
    Ok(Step { acceptance, drafts })
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
