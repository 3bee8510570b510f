//! What adaptive self-speculation estimates and learns: every exit's acceptance
//! ([`ExitEstimates`]), the step costs ([`CostModel`]), and what a generator remembers of both
//! ([`Memory`]). Pure arithmetic, tested on its own.

/// Deeper exits whose shadow tokens a probing step measures during verification (each costs
/// one exit head over the step's rows).
pub const PROBES_PER_STEP: usize = 2;
/// Every this many steps one probes (on every step, the probes' heads and the verification cut
/// into pieces cost the shipped model on a CPU about 5% of its speed).
pub const PROBE_EVERY: usize = 4;
/// Prompt rows (the last ones) on which every exit is measured before the first step.
pub const CALIBRATION_ROWS: usize = 16;
/// Weight of a new observation in an estimate (about the last 30 observations count: exits
/// that agree 95-99% of the time are told apart only over that many; with 0.1 a short run of
/// matches took an exit to the ceiling and the choice to its longest drafts).
const LEARNING_RATE: f64 = 0.03;
/// Every this many steps the draft count or the exit is one off the best, to keep measuring.
pub const EXPLORE_EVERY: usize = 16;
/// How much of the cost model's past each new step keeps (costs change only slowly, as the
/// context grows, so the design's steps stay in the fit for a few hundred steps).
const COST_MEMORY: f64 = 0.99;
/// Prompt rows an exit's remembered estimate weighs as, when a new prompt calibrates it.
pub const REMEMBERED_ROWS: f64 = 32.0;
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
    /// Steps of [`CostModel::design`] observed so far.
    designed: usize,
}

impl CostModel {
    /// A model for `layers` layers, with no steps yet.
    pub fn new(layers: usize) -> Self {
        Self {
            layers,
            xx: [[0.0; FEATURES]; FEATURES],
            xt: [0.0; FEATURES],
            u0: None,
            designed: 0,
        }
    }

    /// The steps `(E, d)` the first steps take, before the fit chooses: an autoregressive step,
    /// then the shallowest, middle and deepest exits each with one, half the most and the most
    /// drafts (duplicates left out), so that layer loads, drafts and steps vary independently.
    pub fn design(&self, max_speculations: usize) -> Vec<(usize, usize)> {
        let mut points = vec![(1, 0)];
        let last = self.layers - 1;
        for e in [1, self.layers / 2, last] {
            for d in [1, max_speculations.div_ceil(2), max_speculations] {
                if !points.contains(&(e, d)) {
                    points.push((e, d));
                }
            }
        }
        points
    }

    /// Steps of [`CostModel::design`] observed so far.
    pub fn designed(&self) -> usize {
        self.designed
    }

    /// Counts an observed step of the design.
    pub(crate) fn count_designed(&mut self) {
        self.designed += 1;
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
        self.predictor()(e, d)
    }

    /// [`CostModel::predict`] for many steps: the model fitted once (a choice compares every
    /// exit and draft count; a fit is a small linear solve, refitted when a term drops out).
    pub fn predictor(&self) -> impl Fn(usize, usize) -> f64 + '_ {
        let theta = self.coefficients();
        move |e, d| {
            let x = self.features(e, d);
            (0..FEATURES).map(|i| theta[i] * x[i]).sum()
        }
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
    /// Prompt rows the current estimates weigh as in [`ExitEstimates::calibrate`]: 0, or
    /// [`REMEMBERED_ROWS`] once they come from an earlier generation.
    weight: f64,
}

impl ExitEstimates {
    /// Estimates for a model of `layers` layers, all at `prior`.
    pub fn new(layers: usize, max_speculations: usize, prior: f64) -> Self {
        Self {
            alpha: vec![prior.clamp(FLOOR, CEILING); layers],
            layers,
            max_speculations,
            next_probe: 1,
            weight: 0.0,
        }
    }

    /// Starts from the estimates an earlier generation ended with (`alpha[ℓ]`, index 0 unused).
    pub fn remember(&mut self, alpha: &[f64]) {
        for (a, &r) in self.alpha.iter_mut().zip(alpha).skip(1) {
            *a = r.clamp(FLOOR, CEILING);
        }
        self.weight = REMEMBERED_ROWS;
    }

    /// Every exit's estimate (index 0 unused).
    pub fn alphas(&self) -> &[f64] {
        &self.alpha
    }

    /// The estimate of exit `e`.
    pub fn alpha(&self, e: usize) -> f64 {
        self.alpha[e]
    }

    /// Sets exit `e`'s estimate from `matches` of `rows` shadow tokens: a Laplace estimate, or,
    /// with a remembered estimate, one where that counts as [`REMEMBERED_ROWS`] rows.
    pub fn calibrate(&mut self, e: usize, matches: usize, rows: usize) {
        let w = self.weight;
        let a = (w * self.alpha[e] + matches as f64 + 1.0) / (w + rows as f64 + 2.0);
        self.alpha[e] = a.clamp(FLOOR, CEILING);
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
        let predict = cost.predictor();
        let mut best = (1, 0);
        let mut best_rate = 1.0 / predict(1, 0);
        for e in 1..self.layers {
            for d in 1..=self.max_speculations {
                let rate = expected_tokens(self.alpha[e], d) / predict(e, d);
                if rate > best_rate * (1.0 + 1e-9) {
                    best = (e, d);
                    best_rate = rate;
                }
            }
        }
        best
    }

    /// [`ExitEstimates::choose`], except that every [`EXPLORE_EVERY`]th `step` is one off it, in
    /// turn: one draft more, an exit one deeper, one draft fewer, an exit one shallower (each
    /// turned the other way at the end of its range: drafts `1..=max`, exits `1..L`); after an
    /// autoregressive choice, one draft from the exit best at one draft.
    pub fn choose_exploring(&self, cost: &CostModel, step: usize) -> (usize, usize) {
        let (e, d) = self.choose(cost);
        if step % EXPLORE_EVERY != EXPLORE_EVERY - 1 {
            return (e, d);
        }
        if d == 0 {
            let predict = cost.predictor();
            let rate = |e: usize| expected_tokens(self.alpha[e], 1) / predict(e, 1);
            let e = (1..self.layers)
                .max_by(|&a, &b| rate(a).total_cmp(&rate(b)))
                .unwrap_or(1);
            return (e, 1);
        }
        // One off within 1..=top, `up` first (the other way at the end of the range; none if
        // the range holds one value).
        let off = |v: usize, top: usize, up: bool| {
            if (up && v < top) || v == 1 {
                (v + 1).min(top)
            } else {
                v - 1
            }
        };
        let (d_max, e_max) = (self.max_speculations, self.layers - 1);
        match (step / EXPLORE_EVERY) % 4 {
            0 => (e, off(d, d_max, true)),
            1 => (off(e, e_max, true), d),
            2 => (e, off(d, d_max, false)),
            _ => (off(e, e_max, false), d),
        }
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

/// What adaptive self-speculation carries from one generation of a
/// [`Generator`](crate::Generator) to the next: the fitted step costs and every exit's estimate.
#[derive(Debug, Clone)]
pub struct Memory {
    /// The step-cost model, fitted over every generation so far.
    pub cost: CostModel,
    /// Every exit's estimate at the end of the last generation (index 0 unused).
    pub alpha: Option<Vec<f64>>,
}

impl Memory {
    /// Nothing learned yet, for a model of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            cost: CostModel::new(layers),
            alpha: None,
        }
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
        // Observations move an estimate by the learning rate (0.03): a miss keeps 0.97 of it,
        // a match moves it 3% of the way to 1.
        let before = estimates.alpha(2);
        estimates.observe(2, false);
        assert!((estimates.alpha(2) - 0.97 * before).abs() < 1e-12);
        let before = estimates.alpha(2);
        estimates.observe(2, true);
        assert!((estimates.alpha(2) - (before + 0.03 * (1.0 - before))).abs() < 1e-12);
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
        // Exploration: every EXPLORE_EVERY steps one off the choice, in the draft count or the
        // exit (never both), each way in turn.
        let chosen = estimates.choose(&cost);
        let mut seen = std::collections::BTreeSet::new();
        for step in 0..8 * EXPLORE_EVERY {
            let (e, d) = estimates.choose_exploring(&cost, step);
            if step % EXPLORE_EVERY == EXPLORE_EVERY - 1 {
                assert_eq!(
                    e.abs_diff(chosen.0) + d.abs_diff(chosen.1),
                    1,
                    "step {step}"
                );
                seen.insert((e, d));
            } else {
                assert_eq!((e, d), chosen);
            }
        }
        assert!(
            seen.iter().any(|&(e, _)| e != chosen.0) && seen.iter().any(|&(_, d)| d != chosen.1),
            "{seen:?} around {chosen:?}"
        );
    }

    /// The design's steps alone (before any choice) vary layer loads, drafts and steps
    /// independently enough for the fit to recover all three costs of
    /// `0.1 (d E + L) + 0.4 d + 0.03`; exploring only the draft count around one exit could not.
    #[test]
    fn the_design_separates_the_three_costs() {
        let time = |e: usize, d: usize| 0.1 * (d * e + 8) as f64 + 0.4 * d as f64 + 0.03;
        let mut cost = CostModel::new(8);
        let design = cost.design(6);
        assert_eq!(design.len(), 10);
        assert_eq!(design[0], (1, 0));
        for &(e, d) in &design {
            assert!((1..8).contains(&e) && d <= 6);
        }
        for &(e, d) in &design {
            cost.observe(e, d, time(e, d));
            cost.designed += 1;
        }
        let [u, v, k] = cost.coefficients();
        assert!((u - 0.1).abs() < 0.005, "{u} {v} {k}");
        assert!((v - 0.4).abs() < 0.03, "{u} {v} {k}");
        assert!((k - 0.03).abs() < 0.02, "{u} {v} {k}");
        // A short max keeps the design free of duplicates.
        let short = CostModel::new(2).design(1);
        assert_eq!(short, vec![(1, 0), (1, 1)]);
    }

    /// A remembered estimate weighs as REMEMBERED_ROWS prompt rows: remembered 0.9, then 8 of
    /// 16 rows matching: (32 * 0.9 + 8 + 1) / (32 + 16 + 2) = 0.756; without memory the same
    /// rows give the Laplace estimate 9 / 18.
    #[test]
    fn a_new_prompt_refines_remembered_estimates() {
        let mut fresh = ExitEstimates::new(4, 3, 0.5);
        fresh.calibrate(2, 8, 16);
        assert!((fresh.alpha(2) - 0.5).abs() < 1e-12);
        let mut remembered = ExitEstimates::new(4, 3, 0.5);
        remembered.remember(&[0.0, 0.3, 0.9, 0.6]);
        assert_eq!(remembered.alpha(1), 0.3);
        remembered.calibrate(2, 8, 16);
        assert!((remembered.alpha(2) - 0.756).abs() < 1e-12);
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
