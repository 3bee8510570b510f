//! Running a command on the backend the user named with `--device`. The libraries are generic
//! over `Backend`; this is the one place that names concrete backends.

use layerskip_model::LayerSkipBackend;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::str::FromStr;

use anyhow::{Result, anyhow, bail};
use burn::tensor::Tensor;
use clap::Args;
use layerskip_model::backend::Precision;

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
    pub fn ensure_compiled(self) -> Result<()> {
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
            bail!(
                "device {self} is not compiled into this build; rebuild with `--features {}`",
                self.feature()
            )
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
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad =
            || format!("unknown device {s:?}: expected cpu, cuda, cuda:N, wgpu, vulkan or metal");
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

/// A command body that can run on any backend.
pub trait BackendTask {
    /// Runs on backend `B` with `device`.
    fn run<B: LayerSkipBackend>(self, device: B::Device) -> Result<()>;
}

/// Where a command computes, and in which float type.
#[derive(Args, Debug, Clone, Copy)]
pub struct DeviceArgs {
    /// Compute device: cpu, cuda, cuda:N, wgpu, vulkan, metal.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Compute dtype: f32, f16 or bf16 (weights are converted at load; greedy self-speculation
    /// is exact in f32 and may differ from autoregressive decoding at near-ties in half precision).
    #[arg(long = "dtype", default_value = "f32")]
    pub precision: Precision,
}

/// A command body that can use several devices of one backend (data-parallel training).
pub trait MultiDeviceTask {
    /// Runs on backend `B` with `devices` (at least one).
    fn run<B: LayerSkipBackend>(self, devices: Vec<B::Device>) -> Result<()>;
}

struct Single<T>(T);

impl<T: BackendTask> MultiDeviceTask for Single<T> {
    fn run<B: LayerSkipBackend>(self, devices: Vec<B::Device>) -> Result<()> {
        let device = devices.into_iter().next().expect("one device");
        self.0.run::<B>(device)
    }
}

/// Runs `task` on the backend serving `spec` in `precision`, or says how to compile that backend
/// in, or why the device cannot be used.
pub fn dispatch<T: BackendTask>(spec: DeviceSpec, precision: Precision, task: T) -> Result<()> {
    dispatch_many(&[spec], precision, Single(task))
}

/// [`dispatch`] for several devices, which must all belong to one backend (`cuda:0,cuda:1`;
/// `cpu,cpu` runs two replicas on the one CPU device, which exercises data parallelism but
/// does not speed it up).
pub fn dispatch_many<T: MultiDeviceTask>(
    specs: &[DeviceSpec],
    precision: Precision,
    task: T,
) -> Result<()> {
    let first = *specs.first().ok_or_else(|| anyhow!("no device given"))?;
    if let Some(other) = specs.iter().find(|s| s.feature() != first.feature()) {
        bail!("devices {first} and {other} belong to different backends; use one backend");
    }
    first.ensure_compiled()?;
    #[cfg(feature = "cube")]
    if first != DeviceSpec::Cpu {
        crate::gpu::configure();
    }
    match first {
        #[cfg(feature = "flex")]
        DeviceSpec::Cpu => {
            start::<burn::backend::Flex, T>(specs, precision, |_| Default::default(), task)
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(_) => start::<burn::backend::Cuda, T>(
            specs,
            precision,
            |s| match s {
                DeviceSpec::Cuda(n) => burn::backend::cuda::CudaDevice::new(n),
                _ => unreachable!("one backend"),
            },
            task,
        ),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu => {
            start::<burn::backend::Wgpu, T>(specs, precision, |_| Default::default(), task)
        }
        #[cfg(feature = "vulkan")]
        DeviceSpec::Vulkan => {
            start::<burn::backend::Vulkan, T>(specs, precision, |_| Default::default(), task)
        }
        #[cfg(feature = "metal")]
        DeviceSpec::Metal => {
            start::<burn::backend::Metal, T>(specs, precision, |_| Default::default(), task)
        }
        #[allow(unreachable_patterns)]
        other => unreachable!("{other} passed ensure_compiled but has no arm"),
    }
}

fn start<B: LayerSkipBackend, T: MultiDeviceTask>(
    specs: &[DeviceSpec],
    precision: Precision,
    device_of: impl Fn(DeviceSpec) -> B::Device,
    task: T,
) -> Result<()> {
    let mut devices: Vec<B::Device> = Vec::with_capacity(specs.len());
    for &spec in specs {
        let device = device_of(spec);
        if !devices.contains(&device) {
            precision.apply::<B>(&device)?;
            probe::<B>(spec, &device)?;
        }
        devices.push(device);
    }
    task.run::<B>(devices)
}

/// Creates and reads back one tensor, turning the panic a missing driver or adapter raises
/// inside the backend into an error that names the device.
fn probe<B: LayerSkipBackend>(spec: DeviceSpec, device: &B::Device) -> Result<()> {
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        Tensor::<B, 1>::ones([1], device).into_data()
    }));
    panic::set_hook(hook);
    result.map(drop).map_err(|payload| {
        let why = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("the backend panicked");
        let hint = match spec {
            DeviceSpec::Cuda(_) => "is an NVIDIA driver installed and the GPU visible?",
            DeviceSpec::Cpu => "",
            _ => "is a Vulkan/Metal/DX12 driver installed (on Linux without a GPU: mesa-vulkan-drivers)?",
        };
        let why = why.trim().trim_end_matches('.');
        if hint.is_empty() {
            anyhow!("device {spec} is not usable ({why})")
        } else {
            anyhow!("device {spec} is not usable ({why}); {hint}")
        }
    })
}
