//! Running a command on the backend the user named with `--device`. The libraries are generic
//! over `Backend`; this is the one place that names concrete backends.

use anyhow::Result;
use burn::tensor::backend::Backend;
use layerskip_model::backend::DeviceSpec;

/// A command body that can run on any backend.
pub trait BackendTask {
    /// Runs on backend `B` with `device`.
    fn run<B: Backend>(self, device: B::Device) -> Result<()>;
}

/// Runs `task` on the backend serving `spec`, or says how to compile that backend in.
pub fn dispatch<T: BackendTask>(spec: DeviceSpec, task: T) -> Result<()> {
    spec.ensure_compiled()?;
    match spec {
        #[cfg(feature = "flex")]
        DeviceSpec::Cpu => task.run::<burn::backend::Flex>(Default::default()),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(n) => {
            task.run::<burn::backend::Cuda>(burn::backend::cuda::CudaDevice::new(n))
        }
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu => task.run::<burn::backend::Wgpu>(Default::default()),
        #[cfg(feature = "vulkan")]
        DeviceSpec::Vulkan => task.run::<burn::backend::Vulkan>(Default::default()),
        #[cfg(feature = "metal")]
        DeviceSpec::Metal => task.run::<burn::backend::Metal>(Default::default()),
        #[allow(unreachable_patterns)]
        other => unreachable!("{other} passed ensure_compiled but has no arm"),
    }
}
