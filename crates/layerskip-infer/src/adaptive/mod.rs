//! Self-speculation that picks its exit layer `E` and draft count `d` at every step, after DEL
//! (Zarch et al., arXiv 2504.05598): it keeps an estimate `α_ℓ` of how often a draft made at
//! each exit `ℓ` would be accepted, and takes the `(E, d)` that maximises DEL's tokens per
//! loaded layer,
//!
//! ```text
//! TPL(E, d) = (1 - α_E^(d+1)) / (1 - α_E) / (d E + L)
//! ```
//!
//! (expected tokens a step emits over the layers it loads: `d` drafts through `E` layers and
//! one verification through all `L`). `d = 0` is an autoregressive step (`1 / L`), taken when no
//! exit is worth drafting with.
//!
//! DEL's denominator counts layer loads, which is what a step costs where the weights' trip
//! from memory or the launches dominate (a GPU at batch 1). Where arithmetic does (a CPU), the
//! verification's `d + 1` rows cost more than one. So the denominator here is a step time
//! predicted by a [`CostModel`] fitted to the measured steps, `u (d E + L) + v d + k` (layer
//! loads; per draft: its head and launches and what the verification's extra row costs; the
//! step's own overhead): it starts at DEL's and learns the rest as steps are timed. The first
//! steps a [`Generator`](crate::Generator) takes this way follow a small design over exits and
//! draft counts ([`CostModel::design`]), so that the fit tells the layers' cost from the drafts'
//! and the step's; after it every [`EXPLORE_EVERY`]th step tries one draft more or fewer, or an
//! exit one deeper or shallower, than the best, so that it keeps learning.
//!
//! A generator remembers ([`Memory`]) the fitted costs (a property of the machine and the model)
//! and every exit's estimate across its generations; a new prompt's own rows refine the estimates
//! rather than replace them.
//!
//! The estimates come from shadow tokens: the exit head's choice at a layer the step computes
//! anyway, compared with the full model's token at the same position. At the prompt every exit
//! is measured on its last rows (the prompt runs through the layers one at a time); at each
//! step the drafts themselves measure `α_E`, and on every [`PROBE_EVERY`]th step the
//! verification pass, run in pieces that end at the probed exits (the same arithmetic),
//! measures up to [`PROBES_PER_STEP`] deeper exits on the rows the verifier accepted (an
//! autoregressive step measures its exit too). Each estimate is an exponential average of its
//! observations. The tokens are those of fixed self-speculation with the chosen `(E, d)`:
//! greedy output is the full model's.

mod estimates;

use std::time::Instant;

use burn::tensor::Tensor;
use layerskip_model::LayerSkipBackend;

pub use self::estimates::{
    CALIBRATION_ROWS, CostModel, EXPLORE_EVERY, ExitEstimates, Memory, PROBE_EVERY,
    PROBES_PER_STEP, REMEMBERED_ROWS, expected_tokens, tokens_per_layer,
};
use crate::accept::accept_greedy_ids;
use crate::context::{DecodeContext, Run, Step};
use crate::error::Result;
use crate::options::StreamEvent;
use crate::speculative::sampled_step;

/// Adaptive self-speculative decoding with at most `max_speculations` drafts per step, learning
/// into and from `memory`.
pub(crate) fn decode<B: LayerSkipBackend>(
    ctx: &mut DecodeContext<'_, B>,
    run: &mut Run,
    max_speculations: usize,
    memory: &mut Memory,
    on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
) -> Result<()> {
    let layers = ctx.model().num_layers();
    let mut estimates = ExitEstimates::new(layers, max_speculations, 0.5);
    if let Some(alpha) = &memory.alpha {
        estimates.remember(alpha);
    }
    let cost = &mut memory.cost;
    prefill_calibrating(ctx, run, &mut estimates, on_event)?;
    // The steps not yet observed of the cost design, in order.
    let design_points = cost.design(max_speculations);
    let mut steps = 0;
    while run.is_running() {
        let design = design_points.get(cost.designed()).copied();
        let (exit, speculations) = match design {
            Some(point) => point,
            None => estimates.choose_exploring(cost, steps),
        };
        steps += 1;
        // The step ends with a read of its tokens, so its time is the device's too.
        let start = Instant::now();
        let step = if run.greedy_on_device() {
            // `steps` counts this step already: the first step probes.
            let probe = (steps - 1).is_multiple_of(PROBE_EVERY);
            probing_step(ctx, run, (exit, speculations), &mut estimates, probe)?
        } else {
            let step = sampled_step(ctx, run, exit, speculations)?;
            for i in 0..step.drafts.len().min(step.acceptance.accepted + 1) {
                estimates.observe(exit, i < step.acceptance.accepted);
            }
            step
        };
        let drafted = step.drafts.len();
        if drafted == speculations {
            cost.observe(exit, drafted, start.elapsed().as_secs_f64() * 1e3);
            if design.is_some() {
                cost.count_designed();
            }
        }
        ctx.count_exit(exit, drafted);
        ctx.accept(run, step, (exit, max_speculations), on_event);
    }
    memory.alpha = Some(estimates.alphas().to_vec());
    Ok(())
}

/// The prompt through the layers one at a time; the exit head on the last [`CALIBRATION_ROWS`]
/// rows after each layer (over the draft vocabulary for the early exits) gives every exit's
/// first estimate (its agreement with the last layer there), and the last row the first token.
fn prefill_calibrating<B: LayerSkipBackend>(
    ctx: &mut DecodeContext<'_, B>,
    run: &mut Run,
    estimates: &mut ExitEstimates,
    on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
) -> Result<()> {
    let layers = ctx.model().num_layers();
    let n = run.tokens().len();
    let rows = n.min(CALIBRATION_ROWS);
    let mut h = ctx.model().embed_ids(run.tokens());
    let mut shadows = Vec::with_capacity(layers);
    for l in 0..layers {
        h = ctx.layers(h, l..l + 1, 0)?;
        if l == 0 {
            // Steps read the exit-hidden cache from their own first position on; it only has to
            // hold the prompt's positions.
            ctx.keep_exit_hidden(h.clone())?;
        }
        let tail = h.clone().slice([0..1, n - rows..n]);
        // Early exits choose as their drafts would (over the draft vocabulary, if any).
        shadows.push(if l + 1 == layers {
            DecodeContext::device_argmax_checked(ctx.model().exit_head(tail))
        } else {
            DecodeContext::device_argmax(ctx.draft_logits(tail, run.options())?)
        });
    }
    let ids = ctx.read_ids(Tensor::cat(shadows, 1))?;
    let last = &ids[(layers - 1) * rows..];
    for e in 1..layers {
        let shadow = &ids[(e - 1) * rows..e * rows];
        // Row i's shadow predicts the token after it; the last row's is the first token.
        let matches = shadow.iter().zip(last).filter(|(a, b)| a == b).count();
        estimates.calibrate(e, matches, rows);
    }
    let first = if run.next_on_device() {
        last[rows - 1]
    } else {
        let row = ctx.logit_rows(h.slice([0..1, n - 1..n]))?.remove(0);
        run.choose_next(row)
    };
    ctx.emit(run, &[first], on_event);
    Ok(())
}

/// A greedy step ([`crate::speculative::greedy_step`]) with, when `probe`, the verification run
/// in pieces, the exit head taken after each probed exit on the step's rows; the one read brings
/// back the drafts, the verifier's tokens and the shadow tokens, which update the estimates (the
/// drafts alone when not probing).
fn probing_step<B: LayerSkipBackend>(
    ctx: &mut DecodeContext<'_, B>,
    run: &Run,
    (exit, speculations): (usize, usize),
    estimates: &mut ExitEstimates,
    probe: bool,
) -> Result<Step> {
    let layers = ctx.model().num_layers();
    let c = run.newest();
    let d = ctx.draft_count(run, speculations);
    // With no drafts the step is the full model on one token: layers < E, then the rest.
    let exit = if d == 0 { 1 } else { exit };
    let mut ids = ctx.draft_on_device(run, exit, d)?;
    // Without drafts the exit's own choice is measured too (from the exit-hidden state).
    let probes = if probe {
        estimates.probes(if d == 0 { exit - 1 } else { exit })
    } else {
        Vec::new()
    };
    let mut deep = ctx.exit_hidden(c);
    let mut shadows = Vec::with_capacity(probes.len());
    if probes.contains(&exit) {
        let logits = ctx.draft_logits(deep.clone(), run.options())?;
        shadows.push(DecodeContext::device_argmax(logits));
    }
    // The verification's deep layers in runs that end at the probed exits.
    let mut from = exit;
    for end in probes.iter().copied().filter(|&p| p > exit).chain([layers]) {
        deep = ctx.layers(deep, from..end, c)?;
        if end < layers {
            let logits = ctx.draft_logits(deep.clone(), run.options())?;
            shadows.push(DecodeContext::device_argmax(logits));
        }
        from = end;
    }
    ids.push(DecodeContext::device_argmax(ctx.model().exit_head(deep)));
    ids.extend(shadows);
    let ids = ctx.read_ids(Tensor::cat(ids, 1))?;
    let (drafts, rest) = ids.split_at(d);
    let (verify, shadows) = rest.split_at(d + 1);
    let acceptance = accept_greedy_ids(drafts, verify);
    // Rows 0..=accepted saw the right tokens; row i's shadow is exit l's choice there.
    let valid = acceptance.accepted + 1;
    for i in 0..d.min(valid) {
        estimates.observe(exit, drafts[i] == verify[i]);
    }
    for (p, &l) in probes.iter().enumerate() {
        let shadow = &shadows[p * (d + 1)..(p + 1) * (d + 1)];
        for i in 0..valid {
            estimates.observe(l, shadow[i] == verify[i]);
        }
    }
    Ok(Step {
        acceptance,
        drafts: drafts.to_vec(),
    })
}
