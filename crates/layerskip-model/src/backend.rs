//! The floating-point type a device computes in ([`Precision`]) and how rounding in it bounds
//! the agreement of two orders of computation.

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::{Backend, set_default_float_dtype};
use burn::tensor::{DType, FloatDType};

use crate::error::ModelError;

/// The floating-point type a device computes in.
///
/// Weights are stored in whatever dtype the checkpoint has and converted at load; every float
/// tensor created afterwards (weights, activations, KV cache) uses the compute dtype. Half
/// precision halves weight and KV memory; greedy self-speculation then equals autoregressive
/// decoding except where the two best logits tie within rounding (the verification pass computes
/// several positions in one matmul, the autoregressive pass one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// 32-bit floats (the default; greedy self-speculation is exact).
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl Precision {
    /// Makes this the default float dtype of `device`. Must run before the first tensor is
    /// created on the device; errors if the backend cannot compute in it or the device already
    /// holds tensors of another dtype.
    pub fn apply<B: Backend>(self, device: &B::Device) -> Result<(), ModelError> {
        let dtype = match self {
            Precision::F32 => return Ok(()),
            Precision::F16 => FloatDType::F16,
            Precision::Bf16 => FloatDType::BF16,
        };
        if !B::supports_dtype(device, dtype.into()) {
            return Err(ModelError::Unsupported(format!(
                "this device ({device:?}) cannot compute in {self}; use --dtype f32"
            )));
        }
        set_default_float_dtype::<B>(device, dtype)
            .map_err(|e| ModelError::Unsupported(format!("cannot switch to {self}: {e}")))
    }

    /// The compute dtype of `device` (its default float dtype).
    pub fn of_device<B: Backend>(device: &B::Device) -> Self {
        match burn::tensor::Tensor::<B, 1>::zeros([1], device).dtype() {
            DType::F16 => Precision::F16,
            DType::BF16 => Precision::Bf16,
            _ => Precision::F32,
        }
    }

    /// The largest gap between the two best logits that rounding in this dtype can plausibly
    /// flip when the same logits are computed in a different order (several positions in one
    /// matmul vs one at a time): `TIE_ULPS` (16) rounding units of the logits' scale. Greedy
    /// divergences at larger gaps are bugs.
    pub fn tie_tolerance(self, logit_scale: f32) -> f32 {
        Self::TIE_ULPS * self.epsilon() * logit_scale.max(1.0)
    }

    /// Rounding units of the logit scale within which a greedy divergence counts as a tie.
    pub const TIE_ULPS: f32 = 16.0;

    /// Relative rounding unit of the dtype (half the gap between 1 and the next float).
    pub fn epsilon(self) -> f32 {
        match self {
            Precision::F32 => f32::EPSILON / 2.0,
            Precision::F16 => 2f32.powi(-11),
            Precision::Bf16 => 2f32.powi(-8),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}

impl FromStr for Precision {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "float32" => Ok(Precision::F32),
            "f16" | "float16" | "half" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(ModelError::InvalidConfig(format!(
                "unknown dtype {s:?}: expected f32, f16 or bf16"
            ))),
        }
    }
}
