//! LayerSkip's schedules as pure functions of (step, layer): layer-dropout rates, early-exit loss
//! scales and curricula (arXiv 2404.16710 §4; torchtune's `layer_dropout` / `early_exit_loss`).

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// A shape `f: [0, 1] -> [0, 1]` over a normalised position (torchtune's `ScaleType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// `1` everywhere.
    Uniform,
    /// `2^x - 1` (the paper's choice).
    Exp,
    /// `x`.
    Linear,
    /// `log2(x + 1)`.
    Log,
    /// `sin(pi x / 2)`.
    Sin,
    /// `1 / (1 + e^-x)`.
    Sigmoid,
}

impl Shape {
    /// `f(val / period)` clipped to `[0, 1]`; `1` when `period == 0` (torchtune's `get_scale`).
    pub fn scale(self, val: f64, period: f64) -> f64 {
        if period == 0.0 {
            return 1.0;
        }
        let x = val / period;
        let y = match self {
            Shape::Uniform => 1.0,
            Shape::Exp => 2f64.powf(x) - 1.0,
            Shape::Linear => x,
            Shape::Log => (x + 1.0).log2(),
            Shape::Sin => (0.5 * std::f64::consts::PI * x).sin(),
            Shape::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        };
        y.clamp(0.0, 1.0)
    }
}

/// Layer dropout: `p(l, t) = S(t) * D(l) * p_max` on the layers of a subset, 0 elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerDropoutConfig {
    /// `p_max`, the rate of the last layer at the end of the curriculum.
    pub p_max: f64,
    /// `D(l)` over `l / (L - 1)`.
    #[serde(default = "default_layer_shape")]
    pub layer_shape: Shape,
    /// `S(t)` over `t / (T - 1)`: `uniform` (continual pretraining, finetuning) or `exp` (from scratch).
    #[serde(default = "default_time_shape")]
    pub time_shape: Shape,
    /// Layers that may be dropped, as a Python-style slice or list: `":"`, `"1::2"`, `"0,4,8"`.
    #[serde(default = "default_layers")]
    pub layers: String,
}

fn default_layer_shape() -> Shape {
    Shape::Exp
}
fn default_time_shape() -> Shape {
    Shape::Uniform
}
fn default_layers() -> String {
    ":".into()
}

impl LayerDropoutConfig {
    /// Checks ranges and the layer syntax.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        if !(0.0..=1.0).contains(&self.p_max) {
            return Err(TrainError::Config(format!(
                "layer_dropout.p_max = {} is not in [0, 1]",
                self.p_max
            )));
        }
        parse_layers(&self.layers, num_layers).map(|_| ())
    }

    /// Dropout rate of every layer at step `step` of `total_steps`.
    pub fn rates(&self, step: usize, total_steps: usize, num_layers: usize) -> Result<Vec<f64>> {
        let enabled = parse_layers(&self.layers, num_layers)?;
        let s = self
            .time_shape
            .scale(step as f64, total_steps.saturating_sub(1) as f64);
        Ok((0..num_layers)
            .map(|l| {
                let d = self
                    .layer_shape
                    .scale(l as f64, num_layers.saturating_sub(1) as f64);
                if enabled[l] { s * d * self.p_max } else { 0.0 }
            })
            .collect())
    }
}

/// Parses a layer subset: `":"`, a Python slice `start:stop:step` (negative indices allowed),
/// or a comma-separated list. Returns a mask over `0..num_layers`.
pub fn parse_layers(spec: &str, num_layers: usize) -> Result<Vec<bool>> {
    let bad = |why: &str| TrainError::Config(format!("layer subset {spec:?}: {why}"));
    let n = num_layers as i64;
    let index = |s: &str| -> Result<i64> {
        let v: i64 = s.trim().parse().map_err(|_| bad("not an integer"))?;
        Ok(if v < 0 { v + n } else { v })
    };
    let mut mask = vec![false; num_layers];
    if spec.contains(':') {
        let parts: Vec<&str> = spec.split(':').collect();
        if parts.len() > 3 {
            return Err(bad("too many ':'"));
        }
        let field = |i: usize, default: i64| -> Result<i64> {
            match parts.get(i).map(|s| s.trim()) {
                None | Some("") => Ok(default),
                Some(s) => index(s),
            }
        };
        let step = match parts.get(2).map(|s| s.trim()) {
            None | Some("") => 1,
            Some(s) => s
                .parse::<i64>()
                .map_err(|_| bad("step is not an integer"))?,
        };
        if step <= 0 {
            return Err(bad("step must be positive"));
        }
        let (start, stop) = (field(0, 0)?.clamp(0, n), field(1, n)?.clamp(0, n));
        let mut l = start;
        while l < stop {
            mask[l as usize] = true;
            l += step;
        }
    } else {
        for item in spec.split(',').filter(|s| !s.trim().is_empty()) {
            let l = index(item)?;
            if !(0..n).contains(&l) {
                return Err(bad(&format!("layer {item} is outside 0..{num_layers}")));
            }
            mask[l as usize] = true;
        }
    }
    Ok(mask)
}

/// How the early-exit loss weighs layer `l` before normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossScale {
    /// The paper's `e(l) = e_scale * sum_{i<=l} i` (`l < L-1`), `e(L-1) = (L-1) + e_scale * sum_{i<=L-2} i`.
    Paper,
    /// torchtune: `1`.
    Uniform,
    /// torchtune: `l + 1`.
    Linear,
    /// torchtune: cumulative sum of `l + 1` over the enabled layers.
    Sum,
    /// torchtune: `sqrt(l + 1)`.
    Sqrt,
    /// torchtune: `1 / (l + 1)`.
    Inv,
    /// torchtune: `1 / sqrt(l + 1)`.
    InvSqrt,
}

/// Normalised loss weights `ẽ` of the enabled layers (ascending): they sum to 1. For torchtune's
/// scales, every layer but the last is multiplied by `e_scale`.
pub fn loss_weights(
    scale: LossScale,
    enabled: &[usize],
    num_layers: usize,
    e_scale: f64,
) -> Vec<f64> {
    let last = num_layers - 1;
    let tri = |l: usize| (l * (l + 1) / 2) as f64; // sum_{i=0}^{l} i
    let mut cumulative = 0.0;
    let raw: Vec<f64> = enabled
        .iter()
        .map(|&l| {
            let x = (l + 1) as f64;
            cumulative += x;
            let f = match scale {
                LossScale::Paper => {
                    // (A one-layer model's only layer gets the weight 1, not L - 1 = 0.)
                    return if l == last {
                        (last as f64).max(1.0) + e_scale * tri(last.saturating_sub(1))
                    } else {
                        e_scale * tri(l)
                    };
                }
                LossScale::Uniform => 1.0,
                LossScale::Linear => x,
                LossScale::Sum => cumulative,
                LossScale::Sqrt => x.sqrt(),
                LossScale::Inv => 1.0 / x,
                LossScale::InvSqrt => 1.0 / x.sqrt(),
            };
            if l < last { f * e_scale } else { f }
        })
        .collect();
    let total: f64 = raw.iter().sum();
    raw.iter()
        .map(|w| if total > 0.0 { w / total } else { 0.0 })
        .collect()
}

/// Which layers contribute to the early-exit loss at each step, `C(t, l)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Curriculum {
    /// Every layer of the subset, every step.
    None,
    /// Every `period`-th layer, the pattern moving one layer deeper each step.
    Rotational {
        /// `R`.
        period: usize,
    },
    /// Layers switch on from the last down to the first, all on at `fraction * T`.
    Gradual {
        /// Fraction of training after which all layers are on (the paper: 0.5).
        #[serde(default = "half")]
        fraction: f64,
    },
}

fn half() -> f64 {
    0.5
}

impl Curriculum {
    /// The enabled layers at `step` of `total_steps`, ascending; the last layer is always on.
    pub fn enabled(&self, step: usize, total_steps: usize, subset: &[bool]) -> Vec<usize> {
        let n = subset.len();
        let on = |l: usize| -> bool {
            match *self {
                Curriculum::None => true,
                Curriculum::Rotational { period } => {
                    (l + period - step % period) % period == period - 1
                }
                Curriculum::Gradual { fraction } => {
                    step as f64 / total_steps.max(1) as f64 >= fraction * (n - l) as f64 / n as f64
                }
            }
        };
        (0..n)
            .filter(|&l| l == n - 1 || (subset[l] && on(l)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn paper_worked_example() {
        // L = 32, e_scale = 0.2, enabled {7, 15, 23, 31}: e = 5.6, 24, 55.2, 124 -> / 208.8.
        let w = loss_weights(LossScale::Paper, &[7, 15, 23, 31], 32, 0.2);
        close(
            &w,
            &[5.6 / 208.8, 24.0 / 208.8, 55.2 / 208.8, 124.0 / 208.8],
            1e-12,
        );
        close(&w, &[0.027, 0.115, 0.264, 0.594], 5e-4);
        // And the rotational curriculum with R = 8 enables exactly those layers at step 0.
        assert_eq!(
            Curriculum::Rotational { period: 8 }.enabled(0, 100, &[true; 32]),
            vec![7, 15, 23, 31]
        );
    }

    #[test]
    fn weights_sum_to_one_and_last_layer_alone_is_plain_loss() {
        let all: Vec<usize> = (0..12).collect();
        for scale in [
            LossScale::Paper,
            LossScale::Uniform,
            LossScale::Linear,
            LossScale::Sum,
            LossScale::Sqrt,
            LossScale::Inv,
            LossScale::InvSqrt,
        ] {
            let w = loss_weights(scale, &all, 12, 0.3);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{scale:?}");
            assert_eq!(loss_weights(scale, &[11], 12, 0.3), vec![1.0], "{scale:?}");
        }
    }

    #[test]
    fn torchtune_scales_by_hand() {
        // L = 4, enabled {0, 2, 3}, e_scale 0.5.
        close(
            &loss_weights(LossScale::Uniform, &[0, 2, 3], 4, 0.5),
            &[0.25, 0.25, 0.5],
            1e-12,
        );
        // linear: [1, 3, 4] * [.5, .5, 1] = [.5, 1.5, 4] / 6
        close(
            &loss_weights(LossScale::Linear, &[0, 2, 3], 4, 0.5),
            &[0.5 / 6.0, 1.5 / 6.0, 4.0 / 6.0],
            1e-12,
        );
        // sum: cumsum [1, 3, 4] = [1, 4, 8] * [.5, .5, 1] = [.5, 2, 8] / 10.5
        close(
            &loss_weights(LossScale::Sum, &[0, 2, 3], 4, 0.5),
            &[0.5 / 10.5, 2.0 / 10.5, 8.0 / 10.5],
            1e-12,
        );
        // inv: [1, 1/3, 1/4] * [.5, .5, 1] = [.5, 1/6, 1/4]
        let t = 0.5 + 1.0 / 6.0 + 0.25;
        close(
            &loss_weights(LossScale::Inv, &[0, 2, 3], 4, 0.5),
            &[0.5 / t, 1.0 / 6.0 / t, 0.25 / t],
            1e-12,
        );
    }

    /// A one-layer model: its only layer carries the whole loss under every scale (the paper's
    /// `(L - 1) + ...` would give it 0, and an all-zero loss trains nothing).
    #[test]
    fn a_one_layer_model_keeps_its_loss() {
        for scale in [
            LossScale::Paper,
            LossScale::Uniform,
            LossScale::Sum,
            LossScale::Inv,
        ] {
            close(&loss_weights(scale, &[0], 1, 0.3), &[1.0], 1e-12);
        }
        // Two layers are unchanged by the guard: paper [0, 1 + 0] -> [0, 1].
        close(
            &loss_weights(LossScale::Paper, &[0, 1], 2, 0.3),
            &[0.0, 1.0],
            1e-12,
        );
    }

    #[test]
    fn dropout_rates_by_hand() {
        let c = LayerDropoutConfig {
            p_max: 0.2,
            layer_shape: Shape::Exp,
            time_shape: Shape::Uniform,
            layers: ":".into(),
        };
        // D(l) = 2^(l/3) - 1 for L = 4: 0, 0.2599, 0.5874, 1.
        close(
            &c.rates(0, 10, 4).unwrap(),
            &[0.0, 0.2 * 0.259_921, 0.2 * 0.587_401, 0.2],
            1e-6,
        );
        // S_exp at the first step is 0, at the last 1, halfway 2^0.5 - 1.
        let s = LayerDropoutConfig {
            time_shape: Shape::Exp,
            ..c.clone()
        };
        assert!(s.rates(0, 11, 4).unwrap().iter().all(|&p| p == 0.0));
        close(
            &s.rates(10, 11, 4).unwrap(),
            &c.rates(0, 10, 4).unwrap(),
            1e-12,
        );
        assert!((s.rates(5, 11, 4).unwrap()[3] - 0.2 * (2f64.sqrt() - 1.0)).abs() < 1e-12);
        let lin = LayerDropoutConfig {
            layer_shape: Shape::Linear,
            layers: "1::2".into(),
            ..c
        };
        close(
            &lin.rates(3, 10, 4).unwrap(),
            &[0.0, 0.2 / 3.0, 0.0, 0.2],
            1e-12,
        );
    }

    #[test]
    fn shapes_by_hand() {
        assert_eq!(Shape::Uniform.scale(0.0, 5.0), 1.0);
        assert!((Shape::Log.scale(1.0, 1.0) - 1.0).abs() < 1e-12);
        assert!((Shape::Sin.scale(0.5, 1.0) - (std::f64::consts::PI / 4.0).sin()).abs() < 1e-12);
        assert!((Shape::Sigmoid.scale(0.0, 1.0) - 0.5).abs() < 1e-12);
        assert_eq!(Shape::Exp.scale(3.0, 0.0), 1.0);
    }

    #[test]
    fn layer_subset_syntax() {
        assert_eq!(parse_layers(":", 4).unwrap(), vec![true; 4]);
        assert_eq!(
            parse_layers("1::2", 6).unwrap(),
            vec![false, true, false, true, false, true]
        );
        assert_eq!(
            parse_layers("0,4,-1", 6).unwrap(),
            vec![true, false, false, false, true, true]
        );
        assert_eq!(
            parse_layers(":-2", 4).unwrap(),
            vec![true, true, false, false]
        );
        assert!(parse_layers("9", 4).is_err());
        assert!(parse_layers("::0", 4).is_err());
        assert!(parse_layers("a:b", 4).is_err());
    }

    #[test]
    fn rotation_and_gradual_patterns() {
        let rot = Curriculum::Rotational { period: 3 };
        let all = [true; 7];
        assert_eq!(rot.enabled(0, 10, &all), vec![2, 5, 6]);
        assert_eq!(rot.enabled(1, 10, &all), vec![0, 3, 6]);
        assert_eq!(rot.enabled(2, 10, &all), vec![1, 4, 6]);
        assert_eq!(rot.enabled(3, 10, &all), vec![2, 5, 6]);
        // Gradual over T = 80, L = 4: layer l switches on at t >= 0.5 * (4 - l) / 4 * 80.
        let g = Curriculum::Gradual { fraction: 0.5 };
        let all = [true; 4];
        assert_eq!(g.enabled(0, 80, &all), vec![3]);
        assert_eq!(g.enabled(10, 80, &all), vec![3]);
        assert_eq!(g.enabled(20, 80, &all), vec![2, 3]);
        assert_eq!(g.enabled(30, 80, &all), vec![1, 2, 3]);
        assert_eq!(g.enabled(40, 80, &all), vec![0, 1, 2, 3]);
        assert_eq!(
            Curriculum::None.enabled(5, 80, &[false, true, false, false]),
            vec![1, 3]
        );
    }
}
