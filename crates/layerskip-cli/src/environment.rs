//! The environment variables that tune the kernels, read here and nowhere else: the libraries
//! take them as options.
//!
//! | variable | what |
//! |---|---|
//! | `LAYERSKIP_THREADS` | threads of the CPU decoding kernels (1: no helpers) |
//! | `LAYERSKIP_PARALLEL_WORK` | multiply-adds from which a CPU product is split over the threads |
//! | `LAYERSKIP_KERNEL` | `portable`, `avx2` or `avx512`: the CPU product kernel, to compare |
//! | `LAYERSKIP_CUBE_KERNELS` | `0`: the GPU backends run Burn's ops instead of our CubeCL kernels |
//!
//! (`LAYERSKIP_KERNEL_CACHE`, where compiled GPU kernels are kept, is read by `gpu.rs`.)

use anyhow::{Context, Result, bail};
use layerskip_kernels::cpu::{self, CpuOptions, rows::Kernel};

/// Reads the variables and hands them to the libraries, before any kernel runs. A value that
/// does not parse is an error naming the variable.
pub fn configure() -> Result<()> {
    let number = |name: &str| -> Result<Option<usize>> {
        match std::env::var(name) {
            Ok(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .with_context(|| format!("{name}={v:?}: expected a whole number")),
            Err(_) => Ok(None),
        }
    };
    let kernel = match std::env::var("LAYERSKIP_KERNEL") {
        Ok(v) => match Kernel::named(&v) {
            Some(k) => Some(k),
            None => bail!("LAYERSKIP_KERNEL={v:?}: expected portable, avx2 or avx512"),
        },
        Err(_) => None,
    };
    cpu::configure(CpuOptions {
        threads: number("LAYERSKIP_THREADS")?,
        parallel_work: number("LAYERSKIP_PARALLEL_WORK")?,
        kernel,
    });
    #[cfg(feature = "cube")]
    if let Ok(v) = std::env::var("LAYERSKIP_CUBE_KERNELS") {
        layerskip_model::ops::set_kernels_enabled(v.trim() != "0");
    }
    Ok(())
}
