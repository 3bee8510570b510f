//! Products of a few rows with weight matrices: decoding (one row) and self-speculative
//! verification (`d + 1` rows), with what surrounds them in a decoder layer fused in, so that a
//! layer is five launches: RMSNorm of the input computed on the fly, up to three weights in one
//! launch (q, k and v, the keys rotated and written with the values into the KV cache by the
//! same launch: [`launch_fused_qkv_store`]), and an epilogue that adds the residual or forms
//! SwiGLU's product.
//!
//! Each output is a sum over the input features split into a fixed number of interleaved slices
//! (chosen from the weights' shapes alone), each slice summed in order, the slices added in
//! order; each row's RMSNorm is a fixed-order sum too. A row's result is the same whether it is
//! computed alone or with others. Rows go through in passes of [`ROWS_PER_PASS`]; the weights
//! stream from memory once per pass, four loads in flight per thread. A launch of one row (a
//! decode step) is compiled with one-row passes, so it does a quarter of the work of a pass of
//! four; every row's arithmetic is the same in both.

use cubecl::prelude::*;

mod in_out;
mod out_in;

pub use in_out::{launch_fused_qkv_store, launch_fused_rows, stores_whole_heads};
pub use out_in::launch_fused_out_in;

/// Rows computed per pass over the weights.
pub const ROWS_PER_PASS: usize = 4;
/// Output columns per cube of the `[in, out]` kernel; lanes over the features in the `[out, in]` one.
pub(super) const TILE: u32 = 32;
/// Output rows per cube of the `[out, in]` kernel.
pub(super) const OUT_ROWS: u32 = 8;

/// What a [`launch_fused_rows`] call does around its products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// Each weight's product to its own output (up to three weights).
    Plain,
    /// `out = residual + x · w0` (rounded to the tensor type before the add, as two ops would).
    Residual,
    /// `out = silu(x · w0) * (x · w1)`, SwiGLU's gate and up in one pass.
    SwiGlu,
}

/// One pass's input rows: their offsets in `x` and their RMSNorm factors.
#[derive(CubeType, Clone, Copy)]
pub(super) struct Pass {
    pub x0: usize,
    pub x1: usize,
    pub x2: usize,
    pub x3: usize,
    pub inv0: f32,
    pub inv1: f32,
    pub inv2: f32,
    pub inv3: f32,
}

/// Four rows' partial sums.
#[derive(CubeType, Clone, Copy)]
pub(super) struct Sums {
    pub s0: f32,
    pub s1: f32,
    pub s2: f32,
    pub s3: f32,
}

/// The pass over rows `r0..r0 + 4` of `m` rows of `k` features, not normalised. Rows past the
/// end read the last row again; their sums are not stored.
#[cube]
pub(super) fn pass_at(r0: usize, m: usize, k: usize) -> Pass {
    Pass {
        x0: min(r0, m - 1) * k,
        x1: min(r0 + 1, m - 1) * k,
        x2: min(r0 + 2, m - 1) * k,
        x3: min(r0 + 3, m - 1) * k,
        inv0: f32::new(1.0),
        inv1: f32::new(1.0),
        inv2: f32::new(1.0),
        inv3: f32::new(1.0),
    }
}

/// Input feature `f` of the row at offset `at`: normalised (`round(x / rms) * gamma`, as
/// Hugging Face's RMSNorm) when `norm`.
#[cube]
pub(super) fn input<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    at: usize,
    f: usize,
    inv: f32,
    #[comptime] norm: bool,
) -> f32 {
    let v = x[at + f];
    if norm {
        f32::cast_from(F::cast_from(f32::cast_from(v) * inv) * gamma[f])
    } else {
        f32::cast_from(v)
    }
}

/// Rows per pass: 1 for a one-row launch, else [`ROWS_PER_PASS`].
pub(super) fn pass_rows(single: bool) -> usize {
    if single { 1 } else { ROWS_PER_PASS }
}

/// `sums.s_p += input(row p, f) * wv` (row 0 only when `single`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn add_feature<F: Float>(
    sums: &mut Sums,
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    pass: &Pass,
    f: usize,
    wv: f32,
    #[comptime] norm: bool,
    #[comptime] single: bool,
) {
    sums.s0 += input::<F>(x, gamma, pass.x0, f, pass.inv0, norm) * wv;
    if comptime!(!single) {
        sums.s1 += input::<F>(x, gamma, pass.x1, f, pass.inv1, norm) * wv;
        sums.s2 += input::<F>(x, gamma, pass.x2, f, pass.inv2, norm) * wv;
        sums.s3 += input::<F>(x, gamma, pass.x3, f, pass.inv3, norm) * wv;
    }
}

/// Stores the pass rows' sums at `partial[(base + p) * TILE + lane]`.
#[cube]
pub(super) fn stash(
    partial: &mut SharedMemory<f32>,
    sums: &Sums,
    base: usize,
    lane: usize,
    #[comptime] single: bool,
) {
    let tile = TILE as usize;
    partial[base * tile + lane] = sums.s0;
    if comptime!(!single) {
        partial[(base + 1) * tile + lane] = sums.s1;
        partial[(base + 2) * tile + lane] = sums.s2;
        partial[(base + 3) * tile + lane] = sums.s3;
    }
}

/// The slices' sums of pass row `p` (stashed at `(s * stride + offset + p)`), added in order.
#[cube]
pub(super) fn gather(
    partial: &SharedMemory<f32>,
    p: usize,
    lane: usize,
    stride: usize,
    offset: usize,
    #[comptime] slices: usize,
) -> f32 {
    let mut sum = f32::new(0.0);
    for s in 0..slices {
        sum += partial[(s * stride + offset + p) * TILE as usize + lane];
    }
    sum
}

/// The RMSNorm factors `1 / sqrt(mean(x²) + eps)` of the pass's rows: each thread sums the
/// features `≡ tid (mod threads)` in order, then the partial sums are added by halving.
#[cube]
pub(super) fn norm_factors<F: Float>(
    x: &Tensor<F>,
    partial: &mut SharedMemory<f32>,
    pass: &mut Pass,
    k: usize,
    eps: f32,
    #[comptime] single: bool,
) {
    if comptime!(single) {
        norm_factor_one::<F>(x, partial, pass, k, eps);
    } else {
        norm_factors_four::<F>(x, partial, pass, k, eps);
    }
}

/// [`norm_factors`] of a one-row pass.
#[cube]
fn norm_factor_one<F: Float>(
    x: &Tensor<F>,
    partial: &mut SharedMemory<f32>,
    pass: &mut Pass,
    k: usize,
    eps: f32,
) {
    let tid = (UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X) as usize;
    let threads = (CUBE_DIM_X * CUBE_DIM_Y) as usize;
    let mut q0 = f32::new(0.0);
    let mut f = tid;
    while f < k {
        let v0 = f32::cast_from(x[pass.x0 + f]);
        q0 += v0 * v0;
        f += threads;
    }
    partial[tid] = q0;
    sync_cube();
    let mut stride = threads / 2;
    while stride > 0 {
        if tid < stride {
            partial[tid] += partial[tid + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let kf = f32::cast_from(k as u32);
    pass.inv0 = f32::new(1.0) / f32::sqrt(partial[0] / kf + eps);
    sync_cube();
}

/// [`norm_factors`] of a four-row pass.
#[cube]
fn norm_factors_four<F: Float>(
    x: &Tensor<F>,
    partial: &mut SharedMemory<f32>,
    pass: &mut Pass,
    k: usize,
    eps: f32,
) {
    let tid = (UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X) as usize;
    let threads = (CUBE_DIM_X * CUBE_DIM_Y) as usize;
    let (mut q0, mut q1, mut q2, mut q3) =
        (f32::new(0.0), f32::new(0.0), f32::new(0.0), f32::new(0.0));
    let mut f = tid;
    while f < k {
        let (v0, v1) = (
            f32::cast_from(x[pass.x0 + f]),
            f32::cast_from(x[pass.x1 + f]),
        );
        let (v2, v3) = (
            f32::cast_from(x[pass.x2 + f]),
            f32::cast_from(x[pass.x3 + f]),
        );
        q0 += v0 * v0;
        q1 += v1 * v1;
        q2 += v2 * v2;
        q3 += v3 * v3;
        f += threads;
    }
    partial[tid] = q0;
    partial[threads + tid] = q1;
    partial[2 * threads + tid] = q2;
    partial[3 * threads + tid] = q3;
    sync_cube();
    let mut stride = threads / 2;
    while stride > 0 {
        if tid < stride {
            for p in 0..ROWS_PER_PASS {
                partial[p * threads + tid] += partial[p * threads + tid + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
    let kf = f32::cast_from(k as u32);
    pass.inv0 = f32::new(1.0) / f32::sqrt(partial[0] / kf + eps);
    pass.inv1 = f32::new(1.0) / f32::sqrt(partial[threads] / kf + eps);
    pass.inv2 = f32::new(1.0) / f32::sqrt(partial[2 * threads] / kf + eps);
    pass.inv3 = f32::new(1.0) / f32::sqrt(partial[3 * threads] / kf + eps);
    sync_cube();
}

/// The tensors of a product launch ([`launch_fused_rows`], [`launch_fused_out_in`]). Unused inputs and outputs take any tensor of
/// the right type (the kernel does not touch them).
pub struct FusedRows<R: Runtime> {
    /// Input rows `[rows, k]`.
    pub x: TensorArg<R>,
    /// RMSNorm gain `[k]` (read when `eps` is given).
    pub gamma: TensorArg<R>,
    /// Residual `[rows, n0]` (read by [`Epilogue::Residual`]).
    pub residual: TensorArg<R>,
    /// Weights `[k, n_i]`.
    pub weights: [TensorArg<R>; 3],
    /// Outputs `[rows, n_i]` (only the first for [`Epilogue::Residual`] and
    /// [`Epilogue::SwiGlu`]).
    pub outputs: [TensorArg<R>; 3],
}

/// A second argument for the same tensor (a binding is shared, not copied).
pub(super) fn twin<R: Runtime>(arg: &TensorArg<R>) -> TensorArg<R> {
    match arg {
        TensorArg::Handle { handle } => TensorArg::Handle {
            handle: handle.clone(),
        },
        TensorArg::Alias {
            input_pos,
            strides,
            shape,
        } => TensorArg::Alias {
            input_pos: *input_pos,
            strides: strides.clone(),
            shape: shape.clone(),
        },
    }
}
