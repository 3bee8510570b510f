//! CubeCL kernels, generic over the float type chosen at launch (`f32`, `f16`, `bf16`); all
//! arithmetic is in `f32`, rounded once to the tensor's type on store.
//!
//! Inputs are contiguous row-major tensors (callers make them so) indexed linearly. Each kernel
//! has a `launch_*` function that picks its grid; the caller allocates the output.

mod attend;
mod elementwise;
mod rows;

pub use attend::{ATTEND_MAX_HEAD_DIM, AttendArgs, launch_attend};
pub use elementwise::{StoreAt, launch_rms_norm, launch_rope, launch_silu_mul, launch_store_kv};
pub use rows::{
    Epilogue, FusedRows, ROWS_PER_PASS, launch_fused_out_in, launch_fused_qkv_store,
    launch_fused_rows, stores_whole_heads,
};

use cubecl::prelude::*;

/// A sentinel below every real score: `-inf` cannot be written in WGSL.
const NEG_BIG: f32 = -3.0e38;

/// Sums `partial[0..n]` into `partial[0]` by halving strides (`n` = the cube's x size, a power
/// of two): a fixed order, so the sum depends only on the values.
#[cube]
fn tree_sum(partial: &mut SharedMemory<f32>, tid: usize) {
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if tid < stride {
            partial[tid] += partial[tid + stride];
        }
        sync_cube();
        stride /= 2;
    }
}

/// [`tree_sum`] with `max`.
#[cube]
fn tree_max(partial: &mut SharedMemory<f32>, tid: usize) {
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if tid < stride {
            partial[tid] = f32::max(partial[tid], partial[tid + stride]);
        }
        sync_cube();
        stride /= 2;
    }
}
