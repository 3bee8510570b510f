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
//! step's own overhead): it starts at DEL's and learns the rest as steps are timed; every
//! [`EXPLORE_EVERY`]th step tries one draft more or fewer than the best, so that it can.
//!
//! The estimates come from shadow tokens: the exit head's choice at a layer the step computes
//! anyway, compared with the full model's token at the same position. At the prompt every exit
//! is measured on its last rows (the prompt runs through the layers one at a time); at each
//! step the drafts themselves measure `α_E`, and the verification pass, run in pieces that end
//! at the probed exits (the same arithmetic), measures up to [`PROBES_PER_STEP`] deeper exits on the rows the
//! verifier accepted (an autoregressive step measures its exit too). Each estimate is an
//! exponential average of its observations. The tokens
//! are those of fixed self-speculation with the chosen `(E, d)`: greedy output is
//! the full model's.

use std::time::Instant;

use burn::tensor::Tensor;
use layerskip_model::LayerSkipBackend;

use crate::accept::accept_greedy_ids;
use crate::context::{DecodeContext, Run};
use crate::error::Result;
use crate::options::StreamEvent;
use crate::speculative::Step;

/// Deeper exits whose shadow tokens a step measures during verification (each costs one exit
/// head over the step's rows).
pub const PROBES_PER_STEP: usize = 2;
/// Prompt rows (the last ones) on which every exit is measured before the first step.
pub const CALIBRATION_ROWS: usize = 16;
/// Weight of a new observation in an estimate.
const LEARNING_RATE: f64 = 0.1;
/// Every this many steps the draft count is one off the best, to measure the cost of rows.
pub const EXPLORE_EVERY: usize = 8;
/// How much of the cost model's past each new step keeps.
const COST_MEMORY: f64 = 0.95;
/// Pseudo-steps of the cost model's prior (DEL's layer count).
const COST_PRIOR_STEPS: f64 = 0.02;
/// Estimates stay inside `[FLOOR, CEILING]` so that the expected lengths stay finite.
const FLOOR: f64 = 0.01;
const CEILING: f64 = 0.99;

/// DEL's expected tokens per loaded layer of a step with `d` drafts from exit `e` of `layers`
/// at acceptance `alpha`.
pub fn tokens_per_layer(alpha: f64, e: usize, d: usize, layers: usize) -> f64 {
    let alpha = alpha.clamp(FLOOR, CEILING);
    let tokens = (1.0 - alpha.powi(d as i32 + 1)) / (1.0 - alpha);
    tokens / (d * e + layers) as f64
}

/// Expected tokens a step with `d` drafts emits at acceptance `alpha` (accepted drafts and the
/// verifier's token).
pub fn expected_tokens(alpha: f64, d: usize) -> f64 {
    let alpha = alpha.clamp(FLOOR, CEILING);
    (1.0 - alpha.powi(d as i32 + 1)) / (1.0 - alpha)
}

/// Features of a step's time: DEL's layer loads `d E + L`, the drafts `d`, and the step itself.
/// A verification pass whose rows each cost a little (`a + b r` for `r` rows) adds `b L` per
/// draft and per step (`(d + 1) E` draft rows and `(L - E)(d + 1)` verified ones sum to
/// `(d + 1) L`), so these three also cover what the rows cost; each draft's exit head and
/// launches are a cost per draft too.
const FEATURES: usize = 3;

/// A step's time as `u (d E + L) + v d + k`, fitted by least squares to the measured steps,
/// older ones weighing less, around a prior of DEL's `u (d E + L)` scaled by the first step.
#[derive(Debug, Clone)]
pub struct CostModel {
    layers: usize,
    /// Sums of `x xᵀ` and `x t` over the steps, decayed.
    xx: [[f64; FEATURES]; FEATURES],
    xt: [f64; FEATURES],
    /// The prior's `u` (set by the first step).
    u0: Option<f64>,
}

impl CostModel {
    /// A model for `layers` layers, with no steps yet.
    pub fn new(layers: usize) -> Self {
        Self {
            layers,
            xx: [[0.0; FEATURES]; FEATURES],
            xt: [0.0; FEATURES],
            u0: None,
        }
    }

    fn features(&self, e: usize, d: usize) -> [f64; FEATURES] {
        let l = self.layers as f64;
        let (e, d) = (e as f64, d as f64);
        [d * e + l, d, 1.0]
    }

    /// Folds in a step of `d` drafts from exit `e` that took `ms`.
    pub fn observe(&mut self, e: usize, d: usize, ms: f64) {
        let x = self.features(e, d);
        self.u0.get_or_insert(ms / x[0]);
        for i in 0..FEATURES {
            self.xt[i] = COST_MEMORY * self.xt[i] + x[i] * ms;
            for j in 0..FEATURES {
                self.xx[i][j] = COST_MEMORY * self.xx[i][j] + x[i] * x[j];
            }
        }
    }

    /// The fitted coefficients `[u, v, k]`: DEL's `[1, 0, 0]` before any step. Terms
    /// fitted below zero (no cost is negative) are dropped and the rest refitted.
    pub fn coefficients(&self) -> [f64; FEATURES] {
        let Some(u0) = self.u0 else {
            return [1.0, 0.0, 0.0];
        };
        let mut active = [true; FEATURES];
        loop {
            let theta = self.fit(u0, &active);
            match (1..FEATURES).find(|&i| active[i] && theta[i] < 0.0) {
                Some(i) => active[i] = false,
                None if theta[0] > 0.0 => return theta,
                None => return [u0, 0.0, 0.0],
            }
        }
    }

    /// Ridge least squares over the `active` features, each pulled towards the prior (`u0`
    /// for the layer loads, 0 for the others) with [`COST_PRIOR_STEPS`] typical steps' weight.
    fn fit(&self, u0: f64, active: &[bool; FEATURES]) -> [f64; FEATURES] {
        let l = self.layers as f64;
        let scale = [l * l, 4.0, 1.0];
        let prior = [u0, 0.0, 0.0];
        let idx: Vec<usize> = (0..FEATURES).filter(|&i| active[i]).collect();
        let n = idx.len();
        let mut a = vec![vec![0.0; n + 1]; n];
        for (r, &i) in idx.iter().enumerate() {
            for (c, &j) in idx.iter().enumerate() {
                a[r][c] = self.xx[i][j];
            }
            a[r][r] += COST_PRIOR_STEPS * scale[i];
            a[r][n] = self.xt[i] + COST_PRIOR_STEPS * scale[i] * prior[i];
        }
        // Gaussian elimination with partial pivoting (the matrix is symmetric positive definite).
        for col in 0..n {
            let pivot = (col..n)
                .max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))
                .expect("a non-empty range");
            a.swap(col, pivot);
            let pivot_row = a[col].clone();
            for (row, r) in a.iter_mut().enumerate() {
                if row != col {
                    let f = r[col] / pivot_row[col];
                    for (x, p) in r[col..].iter_mut().zip(&pivot_row[col..]) {
                        *x -= f * p;
                    }
                }
            }
        }
        let mut theta = [0.0; FEATURES];
        for (r, &i) in idx.iter().enumerate() {
            theta[i] = a[r][n] / a[r][r];
        }
        theta
    }

    /// The predicted time of a step of `d` drafts from exit `e` (in the units observed).
    pub fn predict(&self, e: usize, d: usize) -> f64 {
        let theta = self.coefficients();
        let x = self.features(e, d);
        (0..FEATURES).map(|i| theta[i] * x[i]).sum()
    }
}

/// The acceptance estimates of every exit `1..L` and the choice they lead to.
#[derive(Debug, Clone)]
pub struct ExitEstimates {
    /// `alpha[ℓ]` for exits `ℓ = 1..L` (index 0 unused).
    alpha: Vec<f64>,
    layers: usize,
    max_speculations: usize,
    /// The next deeper exit to probe (round robin).
    next_probe: usize,
}

impl ExitEstimates {
    /// Estimates for a model of `layers` layers, all at `prior`.
    pub fn new(layers: usize, max_speculations: usize, prior: f64) -> Self {
        Self {
            alpha: vec![prior.clamp(FLOOR, CEILING); layers],
            layers,
            max_speculations,
            next_probe: 1,
        }
    }

    /// The estimate of exit `e`.
    pub fn alpha(&self, e: usize) -> f64 {
        self.alpha[e]
    }

    /// Sets exit `e`'s estimate from `matches` of `rows` shadow tokens (a Laplace estimate).
    pub fn calibrate(&mut self, e: usize, matches: usize, rows: usize) {
        self.alpha[e] = ((matches as f64 + 1.0) / (rows as f64 + 2.0)).clamp(FLOOR, CEILING);
    }

    /// Folds in whether a shadow token of exit `e` matched the full model's.
    pub fn observe(&mut self, e: usize, matched: bool) {
        let m = if matched { 1.0 } else { 0.0 };
        let a = &mut self.alpha[e];
        *a = ((1.0 - LEARNING_RATE) * *a + LEARNING_RATE * m).clamp(FLOOR, CEILING);
    }

    /// The `(E, d)` of the most expected tokens per predicted unit of time under `cost`, `d`
    /// up to the maximum (`d = 0`: an autoregressive step, `E` then unused). Ties go to the
    /// shallower exit and fewer drafts. With [`CostModel::new`]'s prior this is DEL's choice.
    pub fn choose(&self, cost: &CostModel) -> (usize, usize) {
        let mut best = (1, 0);
        let mut best_rate = 1.0 / cost.predict(1, 0);
        for e in 1..self.layers {
            for d in 1..=self.max_speculations {
                let rate = expected_tokens(self.alpha[e], d) / cost.predict(e, d);
                if rate > best_rate * (1.0 + 1e-9) {
                    best = (e, d);
                    best_rate = rate;
                }
            }
        }
        best
    }

    /// [`ExitEstimates::choose`], except that every [`EXPLORE_EVERY`]th `step` drafts one more
    /// or one fewer (alternately, within `1..=max`) from the chosen exit, or, after an
    /// autoregressive choice, one draft from the exit best at one draft.
    pub fn choose_exploring(&self, cost: &CostModel, step: usize) -> (usize, usize) {
        let (e, d) = self.choose(cost);
        if step % EXPLORE_EVERY != EXPLORE_EVERY - 1 {
            return (e, d);
        }
        if d == 0 {
            let rate = |e: usize| expected_tokens(self.alpha[e], 1) / cost.predict(e, 1);
            let e = (1..self.layers)
                .max_by(|&a, &b| rate(a).total_cmp(&rate(b)))
                .unwrap_or(1);
            return (e, 1);
        }
        let more = (step / EXPLORE_EVERY).is_multiple_of(2);
        let other = if (more && d < self.max_speculations) || d == 1 {
            d + 1
        } else {
            d - 1
        };
        (e, other.min(self.max_speculations))
    }

    /// Up to [`PROBES_PER_STEP`] exits deeper than `e` (of `e + 1..L`) to measure at this step,
    /// taken in turn.
    pub fn probes(&mut self, e: usize) -> Vec<usize> {
        let deeper: Vec<usize> = (e + 1..self.layers).collect();
        if deeper.is_empty() {
            return Vec::new();
        }
        let start = deeper
            .iter()
            .position(|&l| l >= self.next_probe)
            .unwrap_or(0);
        let mut chosen: Vec<usize> = (0..PROBES_PER_STEP.min(deeper.len()))
            .map(|i| deeper[(start + i) % deeper.len()])
            .collect();
        self.next_probe = chosen.last().map_or(1, |&l| l + 1);
        chosen.sort_unstable();
        chosen
    }
}

/// Adaptive self-speculative decoding with at most `max_speculations` drafts per step.
pub(crate) fn decode<B: LayerSkipBackend>(
    ctx: &mut DecodeContext<'_, B>,
    run: &mut Run,
    max_speculations: usize,
    on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
) -> Result<()> {
    let layers = ctx.model.num_layers();
    let mut estimates = ExitEstimates::new(layers, max_speculations, 0.5);
    let mut cost = CostModel::new(layers);
    ctx.prefill_calibrating(run, &mut estimates, on_event)?;
    let mut steps = 0;
    while run.stop.is_none() {
        let (exit, speculations) = estimates.choose_exploring(&cost, steps);
        steps += 1;
        // The step ends with a read of its tokens, so its time is the device's too.
        let start = Instant::now();
        let step = if run.options.greedy_on_device() {
            ctx.probing_step(run, exit, speculations, &mut estimates)?
        } else {
            let step = ctx.speculative_step(run, exit, speculations)?;
            let drafted = step.drafts.len();
            for i in 0..drafted.min(step.acceptance.accepted + 1) {
                estimates.observe(exit, i < step.acceptance.accepted);
            }
            step
        };
        let drafted = step.drafts.len();
        if drafted == speculations {
            cost.observe(exit, drafted, start.elapsed().as_secs_f64() * 1e3);
        }
        if step.drafts.is_empty() {
            ctx.stats.autoregressive_steps += 1;
        } else {
            let used = &mut ctx.stats.exit_histogram;
            if used.len() <= exit {
                used.resize(exit + 1, 0);
            }
            used[exit] += 1;
        }
        ctx.finish_step(run, step, max_speculations, on_event);
    }
    Ok(())
}

impl<B: LayerSkipBackend> DecodeContext<'_, B> {
    /// The prompt through the layers one at a time; the exit head on the last
    /// [`CALIBRATION_ROWS`] rows after each layer (over the draft vocabulary for the early
    /// exits) gives every exit's first estimate (its agreement with the last layer there), and
    /// the last row the first token.
    fn prefill_calibrating(
        &mut self,
        run: &mut Run,
        estimates: &mut ExitEstimates,
        on_event: &mut impl FnMut(StreamEvent<'_>) -> bool,
    ) -> Result<()> {
        let layers = self.model.num_layers();
        let prompt = run.tokens.clone();
        let n = prompt.len();
        let rows = n.min(CALIBRATION_ROWS);
        let mut h = self.model.embed_ids(&prompt);
        let mut shadows = Vec::with_capacity(layers);
        for l in 0..layers {
            h = self.layers(h, l..l + 1, 0)?;
            if l == 0 {
                // Steps read the exit-hidden cache from their own first position on; it only
                // has to hold the prompt's positions.
                self.exits.append(h.clone())?;
            }
            let tail = h.clone().slice([0..1, n - rows..n]);
            // Early exits choose as their drafts would (over the draft vocabulary, if any).
            shadows.push(if l + 1 == layers {
                Self::device_argmax_checked(self.model.exit_head(tail))
            } else {
                Self::device_argmax(self.draft_logits(tail, &run.options)?)
            });
        }
        let ids = self.read_ids(Tensor::cat(shadows, 1))?;
        let last = &ids[(layers - 1) * rows..];
        for e in 1..layers {
            let shadow = &ids[(e - 1) * rows..e * rows];
            // Row i's shadow predicts the token after it; the last row's is the first token.
            let matches = shadow.iter().zip(last).filter(|(a, b)| a == b).count();
            estimates.calibrate(e, matches, rows);
        }
        let first = if run.options.greedy_on_device() {
            last[rows - 1]
        } else {
            let row = self.logit_rows(h.slice([0..1, n - 1..n]))?.remove(0);
            run.choose(row, &prompt).0
        };
        self.emit(run, &[first], on_event);
        Ok(())
    }

    /// [`DecodeContext::greedy_step`] with the verification run in pieces, the exit head taken
    /// after each probed exit on the step's rows; the one read brings back the
    /// drafts, the verifier's tokens and the shadow tokens, which update the estimates.
    fn probing_step(
        &mut self,
        run: &Run,
        exit: usize,
        speculations: usize,
        estimates: &mut ExitEstimates,
    ) -> Result<Step> {
        let layers = self.model.num_layers();
        let c = run.tokens.len() - 1;
        let d = self.draft_count(run, speculations);
        // With no drafts the step is the full model on one token: layers < E, then the rest.
        let exit = if d == 0 { 1 } else { exit };
        let mut ids = self.draft_on_device(run, exit, d)?;
        // Without drafts the exit's own choice is measured too (from the exit-hidden state).
        let probes = estimates.probes(if d == 0 { exit - 1 } else { exit });
        let mut deep = self.exits.since(c);
        let mut shadows = Vec::with_capacity(probes.len());
        if probes.contains(&exit) {
            shadows.push(Self::device_argmax(
                self.draft_logits(deep.clone(), &run.options)?,
            ));
        }
        // The deep layers in runs that end at the probed exits.
        let mut from = exit;
        for end in probes.iter().copied().filter(|&p| p > exit).chain([layers]) {
            deep = self.layers(deep, from..end, c)?;
            if end < layers {
                shadows.push(Self::device_argmax(
                    self.draft_logits(deep.clone(), &run.options)?,
                ));
            }
            from = end;
        }
        ids.push(Self::device_argmax(self.model.exit_head(deep)));
        ids.extend(shadows);
        let ids = self.read_ids(Tensor::cat(ids, 1))?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TPL by hand: α = 0.5, E = 2, d = 3, L = 8: (1 - 0.5^4) / 0.5 = 1.875 tokens over
    /// 3 * 2 + 8 = 14 layers.
    #[test]
    fn tokens_per_layer_is_dels_formula() {
        assert!((tokens_per_layer(0.5, 2, 3, 8) - 1.875 / 14.0).abs() < 1e-12);
        // No drafts: one token per full pass.
        assert!((tokens_per_layer(0.5, 2, 0, 8) - 1.0 / 8.0).abs() < 1e-12);
    }

    #[test]
    fn the_choice_maximises_tokens_per_layer_and_falls_back_to_autoregressive() {
        let mut estimates = ExitEstimates::new(8, 6, 0.05);
        let del = CostModel::new(8);
        // Every exit useless: autoregressive steps.
        assert_eq!(estimates.choose(&del).1, 0);
        // A shallow exit that agrees 90% of the time beats a deeper one at 95%.
        estimates.calibrate(2, 89, 98); // (89 + 1) / 100 = 0.9
        estimates.calibrate(6, 94, 98); // 0.95
        let (e, d) = estimates.choose(&del);
        assert_eq!(e, 2);
        let best = tokens_per_layer(0.9, 2, d, 8);
        for dd in 1..=6 {
            assert!(best >= tokens_per_layer(0.9, 2, dd, 8));
            assert!(best > tokens_per_layer(0.95, 6, dd, 8));
        }
        // Observations move an estimate by the learning rate.
        let before = estimates.alpha(2);
        estimates.observe(2, false);
        assert!((estimates.alpha(2) - 0.9 * before).abs() < 1e-12);
    }

    /// Steps timed as `0.1 (d E + L) + 0.4 d + 0.03` ms: the fit predicts them (the prior,
    /// scaled by the first step, may fold the small constant into the layer term), and with the
    /// drafts' cost known the choice drafts less than DEL's.
    #[test]
    fn the_cost_model_learns_what_extra_rows_cost() {
        let mut cost = CostModel::new(8);
        assert_eq!(cost.coefficients(), [1.0, 0.0, 0.0]);
        let time = |e: usize, d: usize| 0.1 * (d * e + 8) as f64 + 0.4 * d as f64 + 0.03;
        for step in 0..300 {
            let (e, d) = (1 + step % 3, step % 5);
            cost.observe(e, d, time(e, d));
        }
        let [u, v, k] = cost.coefficients();
        assert!((v - 0.4).abs() < 0.05, "{u} {v} {k}");
        for e in 1..8 {
            for d in 0..7 {
                let (got, want) = (cost.predict(e, d), time(e, d));
                assert!(
                    (got - want).abs() < 0.03 * want,
                    "E={e} d={d}: {got} vs {want}"
                );
            }
        }
        let mut estimates = ExitEstimates::new(8, 6, 0.05);
        estimates.calibrate(1, 79, 98); // 0.8
        let (_, d_del) = estimates.choose(&CostModel::new(8));
        let (_, d_fit) = estimates.choose(&cost);
        assert!(d_fit < d_del, "{d_fit} vs {d_del}");
        // Exploration: one draft off the choice every EXPLORE_EVERY steps.
        let chosen = estimates.choose(&cost);
        for step in 0..4 * EXPLORE_EVERY {
            let (e, d) = estimates.choose_exploring(&cost, step);
            assert_eq!(e, chosen.0);
            if step % EXPLORE_EVERY == EXPLORE_EVERY - 1 {
                assert_eq!(d.abs_diff(chosen.1), 1);
            } else {
                assert_eq!(d, chosen.1);
            }
        }
    }

    #[test]
    fn probes_take_the_deeper_exits_in_turn() {
        let mut estimates = ExitEstimates::new(8, 4, 0.5);
        assert_eq!(estimates.probes(2), vec![3, 4]);
        assert_eq!(estimates.probes(2), vec![5, 6]);
        assert_eq!(estimates.probes(2), vec![3, 7]);
        assert_eq!(estimates.probes(7), Vec::<usize>::new());
        assert_eq!(estimates.probes(6), vec![7]);
    }
}
