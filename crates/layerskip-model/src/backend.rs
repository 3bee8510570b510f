//! The compute backends compiled into this build and the device a user names at run time.
//!
//! The model is generic over [`burn::tensor::backend::Backend`]; this module only maps a device
//! string (`cpu`, `cuda:0`, `wgpu`, `vulkan`, `metal`) to the backend that serves it and says how
//! to enable one that is not compiled in.

use std::fmt;
use std::str::FromStr;

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
