//! Settings of the CubeCL runtime behind the GPU backends (CUDA, wgpu), made once per process
//! before the first device is used.

use std::path::PathBuf;
use std::sync::Once;

use cubecl::config::cache::CacheConfig;
use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

/// Where compiled kernels are kept between processes: `$LAYERSKIP_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/layerskip/kernels`, else `~/.cache/layerskip/kernels`.
fn kernel_cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("LAYERSKIP_KERNEL_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("layerskip/kernels")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/layerskip/kernels")))
}

/// Reads CubeCL's settings as it would (a `cubecl.toml` in the working directory, `CUBECL_*`
/// variables) and adds an on-disk cache of compiled kernels unless they name one: CUDA then
/// keeps each kernel's PTX, and a fresh process skips run-time compilation of every kernel an
/// earlier one compiled.
pub fn configure() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if config.compilation.cache.is_none()
            && let Some(dir) = kernel_cache_dir()
            && std::fs::create_dir_all(&dir).is_ok()
        {
            config.compilation.cache = Some(CacheConfig::File(dir));
        }
        CubeClRuntimeConfig::set(config);
    });
}
