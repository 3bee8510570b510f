//! The compute backends compiled into this build and the device a user names at run time.
//!
//! The model is generic over [`burn::tensor::backend::Backend`]; this module only maps a device
//! string (`cpu`, `cuda:0`, `wgpu`, `vulkan`, `metal`) to the backend that serves it and says how
//! to enable one that is not compiled in.

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::{Backend, set_default_float_dtype};
use burn::tensor::{DType, FloatDType};

use crate::error::ModelError;

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The Flex CPU backend.
    Cpu,
    /// CUDA device `n`.
    Cuda(usize),
    /// The default wgpu adapter (Vulkan, Metal, DX12 or GL, whichever the system offers).
    Wgpu,
    /// wgpu through Vulkan with the SPIR-V compiler.
    Vulkan,
    /// wgpu through Metal.
    Metal,
}

impl DeviceSpec {
    /// The cargo feature that compiles this device's backend in.
    pub fn feature(self) -> &'static str {
        match self {
            DeviceSpec::Cpu => "flex",
            DeviceSpec::Cuda(_) => "cuda",
            DeviceSpec::Wgpu => "wgpu",
            DeviceSpec::Vulkan => "vulkan",
            DeviceSpec::Metal => "metal",
        }
    }

    /// Whether this build includes the backend; otherwise an error that says how to enable it.
    pub fn ensure_compiled(self) -> Result<(), ModelError> {
        let compiled = match self {
            DeviceSpec::Cpu => cfg!(feature = "flex"),
            DeviceSpec::Cuda(_) => cfg!(feature = "cuda"),
            DeviceSpec::Wgpu => cfg!(feature = "wgpu"),
            DeviceSpec::Vulkan => cfg!(feature = "vulkan"),
            DeviceSpec::Metal => cfg!(feature = "metal"),
        };
        if compiled {
            Ok(())
        } else {
            Err(ModelError::Unsupported(format!(
                "device {self} is not compiled into this build; rebuild with `--features {}`",
                self.feature()
            )))
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Wgpu => write!(f, "wgpu"),
            DeviceSpec::Vulkan => write!(f, "vulkan"),
            DeviceSpec::Metal => write!(f, "metal"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ModelError::InvalidConfig(format!(
                "unknown device {s:?}: expected cpu, cuda, cuda:N, wgpu, vulkan or metal"
            ))
        };
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "wgpu" => Ok(DeviceSpec::Wgpu),
            "vulkan" => Ok(DeviceSpec::Vulkan),
            "metal" => Ok(DeviceSpec::Metal),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

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
