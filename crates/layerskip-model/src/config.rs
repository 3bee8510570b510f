//! Model configuration: the runtime [`LlamaConfig`] and [`HfLlamaConfig`], a serde mirror of a
//! Hugging Face `config.json`, turned into the runtime config by one function.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Llama 3 style frequency-dependent scaling of the rotary embedding (`rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are divided by this.
    pub factor: f64,
    /// Lower edge of the smooth interpolation band.
    pub low_freq_factor: f64,
    /// Upper edge of the smooth interpolation band.
    pub high_freq_factor: f64,
    /// The context length the model was originally trained with.
    pub original_max_position_embeddings: usize,
}

/// Rotary position embedding settings (rotate-half layout, as in Hugging Face Llama).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// Base of the geometric frequency progression.
    pub theta: f64,
    /// Optional Llama 3 scaling.
    pub llama3_scaling: Option<Llama3RopeScaling>,
}

/// The runtime configuration of a Llama decoder. Build it from a checkpoint with
/// [`LlamaConfig::from_hf_file`], or from [`LlamaConfig::default`] (the shape of the model that
/// ships in `models/default`) with the fields you change, then call [`LlamaConfig::validate`].
///
/// ```
/// use layerskip_model::LlamaConfig;
///
/// let config = LlamaConfig { num_layers: 12, ..LlamaConfig::default() };
/// config.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding, columns of the LM head).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers `L`.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// The longest context the model supports; the KV cache is preallocated up to this.
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Rotary embedding settings.
    pub rope: RopeConfig,
    /// Whether the LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token, if the checkpoint names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (one or several).
    pub eos_token_ids: Vec<u32>,
}

impl Default for LlamaConfig {
    /// The shape of `models/default`: 16 layers of width 256 (MLP 768), 8 heads over 4 kv heads
    /// of 32, an 8192-token vocabulary with a tied head, context 2048, rope theta 10000.
    fn default() -> Self {
        Self {
            vocab_size: 8192,
            hidden_size: 256,
            intermediate_size: 768,
            num_layers: 16,
            num_heads: 8,
            num_kv_heads: 4,
            head_dim: 32,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-5,
            rope: RopeConfig {
                theta: 10_000.0,
                llama3_scaling: None,
            },
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![0],
        }
    }
}

impl LlamaConfig {
    /// Checks every invariant the model relies on, so that a bad config fails at load time.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ModelError::InvalidConfig(format!("{name} must be > 0")));
            }
        }
        // Bounds far above any released Llama, so that a corrupt value is an error here rather
        // than an overflow or an impossible allocation later.
        let bounded = [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_layers, 1 << 12),
            ("num_attention_heads", self.num_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 12),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 25,
            ),
        ];
        for (name, value, limit) in bounded {
            if value > limit {
                return Err(ModelError::InvalidConfig(format!(
                    "{name} = {value} is implausibly large (at most {limit})"
                )));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ModelError::InvalidConfig(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::InvalidConfig(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            )));
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.rope.theta) || !positive(self.rms_norm_eps) {
            return Err(ModelError::InvalidConfig(
                "rope_theta and rms_norm_eps must be positive".into(),
            ));
        }
        for id in self.bos_token_id.iter().chain(&self.eos_token_ids) {
            if *id as usize >= self.vocab_size {
                return Err(ModelError::InvalidConfig(format!(
                    "special token id {id} is outside the vocabulary ({})",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let hf: HfLlamaConfig = serde_json::from_str(&text).map_err(|e| ModelError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        hf.to_runtime().map_err(|e| e.in_file(path))
    }

    /// The Hugging Face `config.json` that describes this model.
    pub fn to_hf(&self, torch_dtype: &str) -> HfLlamaConfig {
        let rope_scaling = self.rope.llama3_scaling.map(|s| HfRopeParameters {
            rope_type: Some("llama3".into()),
            kind: None,
            rope_theta: None,
            factor: Some(s.factor),
            low_freq_factor: Some(s.low_freq_factor),
            high_freq_factor: Some(s.high_freq_factor),
            original_max_position_embeddings: Some(s.original_max_position_embeddings),
        });
        HfLlamaConfig {
            architectures: Some(vec!["LlamaForCausalLM".into()]),
            model_type: Some("llama".into()),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_layers,
            num_attention_heads: self.num_heads,
            num_key_value_heads: Some(self.num_kv_heads),
            head_dim: Some(self.head_dim),
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: Some(self.rope.theta),
            rope_scaling,
            rope_parameters: None,
            tie_word_embeddings: self.tie_word_embeddings,
            hidden_act: Some("silu".into()),
            attention_bias: Some(false),
            mlp_bias: Some(false),
            torch_dtype: Some(torch_dtype.into()),
            dtype: None,
            bos_token_id: self.bos_token_id.map(OneOrMany::One),
            eos_token_id: match self.eos_token_ids.as_slice() {
                [] => None,
                [one] => Some(OneOrMany::One(*one)),
                many => Some(OneOrMany::Many(many.to_vec())),
            },
        }
    }
}

/// A token id field that Hugging Face writes either as an integer or as a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(id) => vec![id],
            OneOrMany::Many(ids) => ids,
        }
    }
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HfRopeParameters {
    /// `"default"`, `"llama3"`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// Older spelling of `rope_type`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// transformers 5 keeps theta here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Llama 3 scaling factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// Llama 3 low frequency factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// Llama 3 high frequency factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// Llama 3 original context length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

/// A serde mirror of the fields of a Hugging Face Llama `config.json` that matter here.
/// Unknown fields are ignored (checkpoints carry many that do not change the computation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct HfLlamaConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<HfRopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<HfRopeParameters>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<OneOrMany>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<OneOrMany>,
}

fn default_max_positions() -> usize {
    2048
}

fn default_eps() -> f64 {
    1e-6
}

impl HfLlamaConfig {
    /// Converts to the runtime config, rejecting architectures and options this model does not implement.
    pub fn to_runtime(&self) -> Result<LlamaConfig> {
        let unsupported = |what: String| Err(ModelError::Unsupported(what));
        if let Some(t) = &self.model_type
            && t != "llama"
        {
            return unsupported(format!("model_type {t:?} (only \"llama\" is supported)"));
        }
        if let Some(archs) = &self.architectures
            && !archs.iter().any(|a| a == "LlamaForCausalLM")
        {
            return unsupported(format!(
                "architectures {archs:?} (expected LlamaForCausalLM)"
            ));
        }
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return unsupported(format!("hidden_act {act:?} (only silu)"));
        }
        if self.attention_bias == Some(true) || self.mlp_bias == Some(true) {
            return unsupported("attention_bias / mlp_bias = true".into());
        }
        if self.num_attention_heads == 0 {
            return Err(ModelError::InvalidConfig(
                "num_attention_heads must be > 0".into(),
            ));
        }
        let rope = self.rope_config()?;
        let config = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope,
            tie_word_embeddings: self.tie_word_embeddings,
            bos_token_id: self
                .bos_token_id
                .clone()
                .and_then(|b| b.into_vec().first().copied()),
            eos_token_ids: self
                .eos_token_id
                .clone()
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }

    fn rope_config(&self) -> Result<RopeConfig> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = self
            .rope_theta
            .or(params.and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0);
        let kind = params
            .and_then(|p| p.rope_type.clone().or(p.kind.clone()))
            .unwrap_or_else(|| "default".into());
        let llama3_scaling = match (kind.as_str(), params) {
            ("default", _) => None,
            ("llama3", Some(p)) => {
                let field = |name: &str, v: Option<f64>| {
                    v.ok_or_else(|| {
                        ModelError::InvalidConfig(format!("llama3 rope scaling lacks {name}"))
                    })
                };
                Some(Llama3RopeScaling {
                    factor: field("factor", p.factor)?,
                    low_freq_factor: field("low_freq_factor", p.low_freq_factor)?,
                    high_freq_factor: field("high_freq_factor", p.high_freq_factor)?,
                    original_max_position_embeddings: p
                        .original_max_position_embeddings
                        .ok_or_else(|| {
                            ModelError::InvalidConfig(
                                "llama3 rope scaling lacks original_max_position_embeddings".into(),
                            )
                        })?,
                })
            }
            (other, _) => {
                return Err(ModelError::Unsupported(format!(
                    "rope_type {other:?} is not supported (supported: the default rotary embedding and \"llama3\" scaling)"
                )));
            }
        };
        Ok(RopeConfig {
            theta,
            llama3_scaling,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default configuration is the shape of the model that ships in `models/default`.
    #[test]
    fn default_is_the_shipped_models_config() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/default/config.json"
        );
        let shipped = LlamaConfig::from_hf_file(std::path::Path::new(path)).unwrap();
        assert_eq!(LlamaConfig::default(), shipped);
        LlamaConfig::default().validate().unwrap();
    }
}
