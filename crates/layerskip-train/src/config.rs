//! The training configuration: TOML with unknown fields rejected and every value checked at load.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::schedule::{Curriculum, LayerDropoutConfig, LossScale, parse_layers};

/// The architecture of a model trained from scratch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Vocabulary of the byte-level BPE tokenizer trained on the data.
    pub vocab_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Rotary base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Tie the LM head to the embedding.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
}

impl ModelShape {
    /// The Llama configuration of a model of this shape over a `vocab_size`-token tokenizer whose
    /// sequences end with `eos_token_ids`: head width `hidden_size / num_heads` (the caller checks
    /// that it divides), RMSNorm epsilon 1e-5, no bos token.
    pub fn llama_config(
        &self,
        vocab_size: usize,
        eos_token_ids: Vec<u32>,
    ) -> layerskip_model::LlamaConfig {
        layerskip_model::LlamaConfig {
            vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.hidden_size / self.num_heads,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: 1e-5,
            rope: layerskip_model::RopeConfig {
                theta: self.rope_theta,
                llama3_scaling: None,
            },
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: None,
            eos_token_ids,
        }
    }

    /// How a checkpoint's configuration differs from this shape, one `field: shape vs
    /// checkpoint` entry per difference (empty when the checkpoint has this shape).
    pub fn differences(&self, checkpoint: &layerskip_model::LlamaConfig) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |field: &str, ours: String, theirs: String| {
            if ours != theirs {
                out.push(format!("{field}: {ours} (preset) vs {theirs} (checkpoint)"));
            }
        };
        let c = checkpoint;
        check(
            "vocab_size",
            self.vocab_size.to_string(),
            c.vocab_size.to_string(),
        );
        check(
            "num_layers",
            self.num_layers.to_string(),
            c.num_layers.to_string(),
        );
        check(
            "hidden_size",
            self.hidden_size.to_string(),
            c.hidden_size.to_string(),
        );
        check(
            "intermediate_size",
            self.intermediate_size.to_string(),
            c.intermediate_size.to_string(),
        );
        check(
            "num_heads",
            self.num_heads.to_string(),
            c.num_heads.to_string(),
        );
        check(
            "num_kv_heads",
            self.num_kv_heads.to_string(),
            c.num_kv_heads.to_string(),
        );
        check(
            "max_position_embeddings",
            self.max_position_embeddings.to_string(),
            c.max_position_embeddings.to_string(),
        );
        check(
            "rope_theta",
            self.rope_theta.to_string(),
            c.rope.theta.to_string(),
        );
        check(
            "tie_word_embeddings",
            self.tie_word_embeddings.to_string(),
            c.tie_word_embeddings.to_string(),
        );
        out
    }
}

fn default_theta() -> f64 {
    10_000.0
}
fn yes() -> bool {
    true
}

/// Where the data come from and how they are cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Files or directories (`--data` on the command line replaces these).
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// File extensions read from directories (all when empty).
    #[serde(default)]
    pub extensions: Vec<String>,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Fraction of documents held out for evaluation.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
}

fn default_eval_fraction() -> f64 {
    0.05
}

/// AdamW with linear warm-up and cosine decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of the peak.
    #[serde(default = "default_min_lr")]
    pub min_lr_ratio: f64,
    /// Linear warm-up steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Decoupled weight decay.
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Gradient-norm clipping (0 = off).
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Mixed precision: `"bf16"` runs forward and backward in bfloat16 while the master weights,
    /// gradients and AdamW state stay f32 (the loss is computed from f32 logits). f16 would need
    /// loss scaling and is not offered.
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
}

/// The compute dtype of mixed-precision training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixedPrecision {
    /// Everything in the device's dtype (f32).
    #[default]
    Off,
    /// bfloat16 compute, f32 master weights.
    Bf16,
}

fn default_min_lr() -> f64 {
    0.1
}
fn default_wd() -> f64 {
    0.1
}
fn default_clip() -> f64 {
    1.0
}
fn one() -> usize {
    1
}

/// The early-exit loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyExitConfig {
    /// `e_scale`.
    pub e_scale: f64,
    /// The per-layer scale.
    #[serde(default = "paper")]
    pub scale: LossScale,
    /// Which layers get a loss, by step.
    #[serde(default = "no_curriculum")]
    pub curriculum: Curriculum,
    /// Layers eligible for a loss (slice syntax); the last layer always has one.
    #[serde(default = "all_layers")]
    pub layers: String,
}

fn paper() -> LossScale {
    LossScale::Paper
}
fn no_curriculum() -> Curriculum {
    Curriculum::None
}
fn all_layers() -> String {
    ":".into()
}

/// A whole training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Seed of initialisation, data order, and dropout draws.
    #[serde(default)]
    pub seed: u64,
    /// Evaluate every this many steps (0 = only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Held-out batches per evaluation (0 = all).
    #[serde(default)]
    pub eval_batches: usize,
    /// Write a checkpoint every this many steps (0 = only at the end).
    #[serde(default)]
    pub save_every: usize,
    /// The architecture, for training from scratch (ignored with `--model`).
    pub model: Option<ModelShape>,
    /// Data.
    pub data: DataConfig,
    /// Optimizer.
    pub optim: OptimConfig,
    /// Layer dropout (absent = off).
    pub layer_dropout: Option<LayerDropoutConfig>,
    /// Early-exit loss (absent = last layer only).
    pub early_exit: Option<EarlyExitConfig>,
}

impl TrainConfig {
    /// Reads and validates a TOML file; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::File {
            path: path.into(),
            message: e.to_string(),
        })?;
        let config: Self = toml::from_str(&text).map_err(|e| TrainError::File {
            path: path.into(),
            message: e.to_string(),
        })?;
        config.validate_basic()?;
        Ok(config)
    }

    /// Checks the values that do not depend on the model.
    pub fn validate_basic(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.steps == 0 {
            return bad("steps must be > 0".into());
        }
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0 && (0.0..=1.0).contains(&o.min_lr_ratio)) {
            return bad("optim.lr must be > 0 and optim.min_lr_ratio in [0, 1]".into());
        }
        if o.batch_size == 0 || o.grad_accum == 0 || o.grad_clip < 0.0 || o.weight_decay < 0.0 {
            return bad("optim.batch_size and optim.grad_accum must be > 0, grad_clip and weight_decay >= 0".into());
        }
        if self.data.seq_len < 2 || !(0.0..1.0).contains(&self.data.eval_fraction) {
            return bad("data.seq_len must be >= 2 and data.eval_fraction in [0, 1)".into());
        }
        if let Some(e) = &self.early_exit {
            if !(e.e_scale.is_finite() && e.e_scale >= 0.0) {
                return bad(format!("early_exit.e_scale = {} must be >= 0", e.e_scale));
            }
            if let Curriculum::Rotational { period: 0 } = e.curriculum {
                return bad("early_exit.curriculum.period must be > 0".into());
            }
        }
        Ok(())
    }

    /// Checks the values that depend on the number of layers.
    pub fn validate_for(&self, num_layers: usize) -> Result<()> {
        if let Some(d) = &self.layer_dropout {
            d.validate(num_layers)?;
        }
        if let Some(e) = &self.early_exit {
            parse_layers(&e.layers, num_layers)?;
        }
        Ok(())
    }

    /// Every field in which `other` differs from `self`, one `"name: ours -> theirs"` line each
    /// (dotted names as in the TOML, e.g. `optim.lr: 0.001 -> 0.002`).
    pub fn differences(&self, other: &TrainConfig) -> Vec<String> {
        fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
            use serde_json::Value::Object;
            match (a, b) {
                (Object(x), Object(y)) => {
                    let keys: std::collections::BTreeSet<&String> =
                        x.keys().chain(y.keys()).collect();
                    for k in keys {
                        let name = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        let null = serde_json::Value::Null;
                        walk(
                            &name,
                            x.get(k).unwrap_or(&null),
                            y.get(k).unwrap_or(&null),
                            out,
                        );
                    }
                }
                _ if a != b => out.push(format!("{prefix}: {a} -> {b}")),
                _ => {}
            }
        }
        let value = |c: &TrainConfig| serde_json::to_value(c).expect("serialisable config");
        let mut out = Vec::new();
        walk("", &value(self), &value(other), &mut out);
        out
    }

    /// The learning rate at `step`: linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio`.
    pub fn learning_rate(&self, step: usize) -> f64 {
        let o = &self.optim;
        if step < o.warmup_steps {
            return o.lr * (step + 1) as f64 / o.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(o.warmup_steps).max(1) as f64;
        let progress = ((step - o.warmup_steps) as f64 / span).min(1.0);
        let min = o.lr * o.min_lr_ratio;
        min + (o.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
steps = 100
[data]
seq_len = 16
[optim]
lr = 1e-3
warmup_steps = 10
batch_size = 4
"#;

    #[test]
    fn minimal_config_and_schedule_by_hand() {
        let c: TrainConfig = toml::from_str(MINIMAL).unwrap();
        c.validate_basic().unwrap();
        assert!((c.learning_rate(0) - 1e-4).abs() < 1e-15);
        assert!((c.learning_rate(9) - 1e-3).abs() < 1e-15);
        assert!((c.learning_rate(10) - 1e-3).abs() < 1e-15);
        // Halfway through the decay: (lr + min) / 2 with min = 1e-4.
        assert!((c.learning_rate(55) - 5.5e-4).abs() < 1e-12);
        assert!((c.learning_rate(100) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn differences_name_every_changed_field() {
        let a: TrainConfig = toml::from_str(MINIMAL).unwrap();
        assert!(a.differences(&a).is_empty());
        let b: TrainConfig = toml::from_str(
            &MINIMAL
                .replace("seq_len = 16", "seq_len = 32")
                .replace("lr = 1e-3", "lr = 2e-3"),
        )
        .unwrap();
        let with_dropout = format!("{MINIMAL}\n[layer_dropout]\np_max = 0.1\n");
        let c: TrainConfig = toml::from_str(&with_dropout).unwrap();
        assert_eq!(
            a.differences(&b),
            vec!["data.seq_len: 16 -> 32", "optim.lr: 0.001 -> 0.002"]
        );
        let d = a.differences(&c);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("layer_dropout: null -> {"), "{d:?}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected_with_their_names() {
        let typo = MINIMAL.replace("warmup_steps", "warmup_step");
        let err = toml::from_str::<TrainConfig>(&typo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("warmup_step"), "{err}");
        let c: TrainConfig = toml::from_str(&MINIMAL.replace("lr = 1e-3", "lr = -1.0")).unwrap();
        assert!(
            c.validate_basic()
                .unwrap_err()
                .to_string()
                .contains("optim.lr")
        );
        let with_dropout = format!("{MINIMAL}\n[layer_dropout]\np_max = 1.5\n");
        let c: TrainConfig = toml::from_str(&with_dropout).unwrap();
        assert!(c.validate_for(4).unwrap_err().to_string().contains("p_max"));
    }
}
