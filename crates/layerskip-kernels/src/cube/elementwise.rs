//! RMSNorm, SwiGLU's product, rotary embedding and the KV-cache write: one launch each where
//! Burn's ops take three to six.

use cubecl::prelude::*;

use super::tree_sum;

/// Threads per RMSNorm row (a power of two, see [`tree_sum`]).
const NORM_THREADS: u32 = 256;
/// Threads per cube of the elementwise kernels.
const ELEMWISE_THREADS: u32 = 256;

/// `out[r, j] = round(x[r, j] / sqrt(mean_j(x[r, :]²) + eps)) * gamma[j]`, one cube per row:
/// Hugging Face's `LlamaRMSNorm` (normalised in f32, rounded to the tensor's type, then scaled).
#[cube(launch)]
fn rms_norm<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    out: &mut Tensor<F>,
    hidden: u32,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let tid = UNIT_POS_X as usize;
    let threads = CUBE_DIM_X as usize;
    let h = hidden as usize;
    let base = CUBE_POS_X as usize * h;
    let mut acc = f32::new(0.0);
    let mut j = tid;
    while j < h {
        let v = f32::cast_from(x[base + j]);
        acc += v * v;
        j += threads;
    }
    let mut partial = SharedMemory::<f32>::new(NORM_THREADS as usize);
    partial[tid] = acc;
    sync_cube();
    tree_sum(&mut partial, tid);
    let inv = f32::new(1.0) / f32::sqrt(partial[0] / f32::cast_from(hidden) + eps);
    let mut j = tid;
    while j < h {
        let normed = F::cast_from(f32::cast_from(x[base + j]) * inv);
        out[base + j] = normed * gamma[j];
        j += threads;
    }
}

/// RMSNorm of `rows` rows of width `hidden` (`x`, `out` `[rows, hidden]`, `gamma` `[hidden]`).
#[allow(clippy::too_many_arguments)]
pub fn launch_rms_norm<R: Runtime>(
    client: &ComputeClient<R>,
    x: TensorArg<R>,
    gamma: TensorArg<R>,
    out: TensorArg<R>,
    rows: usize,
    hidden: usize,
    eps: f32,
    dtype: StorageType,
) {
    rms_norm::launch::<R>(
        client,
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(NORM_THREADS),
        x,
        gamma,
        out,
        hidden as u32,
        eps,
        dtype,
    );
}

/// `out = silu(gate) * up = gate / (1 + exp(-gate)) * up`, elementwise.
#[cube(launch)]
fn silu_mul<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        let g = f32::cast_from(gate[i]);
        let u = f32::cast_from(up[i]);
        out[i] = F::cast_from(g / (f32::new(1.0) + f32::exp(f32::new(0.0) - g)) * u);
    }
}

/// SwiGLU's product over `len` elements.
pub fn launch_silu_mul<R: Runtime>(
    client: &ComputeClient<R>,
    gate: TensorArg<R>,
    up: TensorArg<R>,
    out: TensorArg<R>,
    len: usize,
    dtype: StorageType,
) {
    let cube_dim = CubeDim::new_1d(ELEMWISE_THREADS);
    let count = cubecl::calculate_cube_count_elemwise(client, len, cube_dim);
    silu_mul::launch::<R>(client, count, cube_dim, gate, up, out, dtype);
}

/// The rotary embedding of element `i` of `x` `[batch, seq, heads, dim]` with tables `[seq,
/// dim]` in the rotate-half layout: `x * cos + rotate_half(x) * sin`.
#[cube]
pub(super) fn rotated<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    i: usize,
    seq: usize,
    heads: usize,
    dim: usize,
) -> f32 {
    let half = dim / 2;
    let j = i % dim;
    let t = (i / (dim * heads)) % seq;
    let mut rot = f32::cast_from(x[i - half]);
    if j < half {
        rot = f32::new(0.0) - f32::cast_from(x[i + half]);
    }
    f32::cast_from(x[i]) * f32::cast_from(cos[t * dim + j]) + rot * f32::cast_from(sin[t * dim + j])
}

#[cube(launch)]
fn rope<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    out: &mut Tensor<F>,
    seq: u32,
    heads: u32,
    dim: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        let r = rotated::<F>(x, cos, sin, i, seq as usize, heads as usize, dim as usize);
        out[i] = F::cast_from(r);
    }
}

/// Rotary embedding of `x` `[batch, seq, heads, dim]` (contiguous) with tables `[seq, dim]`.
#[allow(clippy::too_many_arguments)]
pub fn launch_rope<R: Runtime>(
    client: &ComputeClient<R>,
    x: TensorArg<R>,
    cos: TensorArg<R>,
    sin: TensorArg<R>,
    out: TensorArg<R>,
    [batch, seq, heads, dim]: [usize; 4],
    dtype: StorageType,
) {
    let cube_dim = CubeDim::new_1d(ELEMWISE_THREADS);
    let len = batch * seq * heads * dim;
    let count = cubecl::calculate_cube_count_elemwise(client, len, cube_dim);
    rope::launch::<R>(
        client,
        count,
        cube_dim,
        x,
        cos,
        sin,
        out,
        seq as u32,
        heads as u32,
        dim as u32,
        dtype,
    );
}

/// Writes the new keys (rotated) and values `[batch, seq, kv_heads, dim]` into the cache buffers
/// `[batch, kv_heads, capacity, dim]` at positions `at..at + seq`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn store_kv<F: Float>(
    keys: &Tensor<F>,
    values: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    key_cache: &mut Tensor<F>,
    value_cache: &mut Tensor<F>,
    seq: u32,
    kv_heads: u32,
    dim: u32,
    capacity: u32,
    at: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i < keys.len() {
        let (s, h, d) = (seq as usize, kv_heads as usize, dim as usize);
        let j = i % d;
        let g = (i / d) % h;
        let t = (i / (d * h)) % s;
        let b = i / (d * h * s);
        let dst = ((b * h + g) * capacity as usize + at as usize + t) * d + j;
        key_cache[dst] = F::cast_from(rotated::<F>(keys, cos, sin, i, s, h, d));
        value_cache[dst] = values[i];
    }
}

/// The cache buffers and where the new positions go, for [`launch_store_kv`].
pub struct StoreAt<R: Runtime> {
    /// Key buffer `[batch, kv_heads, capacity, dim]`, written in place.
    pub key_cache: TensorArg<R>,
    /// Value buffer, same shape.
    pub value_cache: TensorArg<R>,
    /// Positions each buffer holds.
    pub capacity: usize,
    /// Position of the first new row.
    pub at: usize,
}

/// Rotates the new keys and writes them and the new values `[batch, seq, kv_heads, dim]` into
/// the cache at `to.at..` (tables `[seq, dim]`).
#[allow(clippy::too_many_arguments)]
pub fn launch_store_kv<R: Runtime>(
    client: &ComputeClient<R>,
    keys: TensorArg<R>,
    values: TensorArg<R>,
    cos: TensorArg<R>,
    sin: TensorArg<R>,
    to: StoreAt<R>,
    [batch, seq, kv_heads, dim]: [usize; 4],
    dtype: StorageType,
) {
    let cube_dim = CubeDim::new_1d(ELEMWISE_THREADS);
    let count =
        cubecl::calculate_cube_count_elemwise(client, batch * seq * kv_heads * dim, cube_dim);
    store_kv::launch::<R>(
        client,
        count,
        cube_dim,
        keys,
        values,
        cos,
        sin,
        to.key_cache,
        to.value_cache,
        seq as u32,
        kv_heads as u32,
        dim as u32,
        to.capacity as u32,
        to.at as u32,
        dtype,
    );
}
