//! Causal grouped-query attention of new query rows (rotated on load) over the preallocated KV
//! cache.
//!
//! One cube per (query row, head) attends to the positions `0..=start + row` of its kv head's
//! buffer in place: no gathered copy of the prefix, no repeated kv heads, no mask tensor, and the
//! launch has the same shape at every step of a decode, whatever the cache holds. Keys are taken
//! in chunks with an online softmax, so any context length fits in fixed shared memory.
//!
//! The head dim is a compile-time constant, so a thread's dot product over a key is unrolled and
//! its loads all go out before the first product; the weighted sum over values keeps four loads
//! in flight per thread. Both stay in the same order as a plain loop.

use cubecl::prelude::*;

use super::elementwise::rotated;
use super::{NEG_BIG, tree_max, tree_sum};

/// Threads per cube (a power of two, at least the head dim).
const THREADS: u32 = 256;
/// Keys scored per chunk.
const CHUNK: usize = 512;
/// The largest head dim the kernel takes.
pub const ATTEND_MAX_HEAD_DIM: usize = 128;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attend<F: Float>(
    q: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    keys: &Tensor<F>,
    values: &Tensor<F>,
    out: &mut Tensor<F>,
    seq: u32,
    groups: u32,
    capacity: u32,
    start: u32,
    scale: f32,
    #[comptime] dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let tid = UNIT_POS_X as usize;
    let threads = CUBE_DIM_X as usize;
    let heads = CUBE_COUNT_X as usize;
    let (h, row) = (CUBE_POS_X as usize, CUBE_POS_Y as usize);
    let d = dim;
    let i = row % seq as usize;
    let b = row / seq as usize;
    let kv_heads = heads / groups as usize;
    let visible = start as usize + i + 1;
    let kv_base = (b * kv_heads + h / groups as usize) * capacity as usize * d;
    let q_base = (row * heads + h) * d;

    let mut query = SharedMemory::<f32>::new(ATTEND_MAX_HEAD_DIM);
    let mut scores = SharedMemory::<f32>::new(CHUNK);
    let mut partial = SharedMemory::<f32>::new(THREADS as usize);
    // The query, rotated (and rounded to the tensor type, as a separate rope would) and scaled.
    if tid < d {
        let rq = rotated::<F>(q, cos, sin, q_base + tid, seq as usize, heads, d);
        query[tid] = f32::cast_from(F::cast_from(rq)) * scale;
    }
    sync_cube();
    // Thread `tid` sums output feature `tid % d` over the keys `≡ tid / d (mod slices)`.
    let slices = threads / d;
    let (feature, slice) = (tid % d, tid / d);
    let mut max_score = f32::new(NEG_BIG);
    let mut total = f32::new(0.0);
    let mut acc = f32::new(0.0);
    let mut chunk_start = 0usize;
    while chunk_start < visible {
        let n = min(CHUNK, visible - chunk_start);
        let mut t = tid;
        let mut local_max = f32::new(NEG_BIG);
        while t < n {
            let key = kv_base + (chunk_start + t) * d;
            let mut dot = f32::new(0.0);
            #[unroll]
            for j in 0..dim {
                dot += query[j] * f32::cast_from(keys[key + j]);
            }
            scores[t] = dot;
            local_max = f32::max(local_max, dot);
            t += threads;
        }
        partial[tid] = local_max;
        sync_cube();
        tree_max(&mut partial, tid);
        let new_max = f32::max(max_score, partial[0]);
        sync_cube();
        let mut t = tid;
        let mut local_sum = f32::new(0.0);
        while t < n {
            let p = f32::exp(scores[t] - new_max);
            scores[t] = p;
            local_sum += p;
            t += threads;
        }
        partial[tid] = local_sum;
        sync_cube();
        tree_sum(&mut partial, tid);
        let rescale = f32::exp(max_score - new_max);
        total = total * rescale + partial[0];
        acc *= rescale;
        if slice < slices {
            let at = kv_base + chunk_start * d + feature;
            let mut t = slice;
            while t + 3 * slices < n {
                let va = f32::cast_from(values[at + t * d]);
                let vb = f32::cast_from(values[at + (t + slices) * d]);
                let vc = f32::cast_from(values[at + (t + 2 * slices) * d]);
                let vd = f32::cast_from(values[at + (t + 3 * slices) * d]);
                acc += scores[t] * va;
                acc += scores[t + slices] * vb;
                acc += scores[t + 2 * slices] * vc;
                acc += scores[t + 3 * slices] * vd;
                t += 4 * slices;
            }
            while t < n {
                acc += scores[t] * f32::cast_from(values[at + t * d]);
                t += slices;
            }
        }
        max_score = new_max;
        sync_cube();
        chunk_start += CHUNK;
    }
    if slice < slices {
        partial[tid] = acc;
    }
    sync_cube();
    if tid < d {
        let mut sum = f32::new(0.0);
        for s in 0..slices {
            sum += partial[s * d + tid];
        }
        out[q_base + tid] = F::cast_from(sum / total);
    }
}

/// The shapes of one [`launch_attend`] call.
#[derive(Debug, Clone, Copy)]
pub struct AttendArgs {
    /// Sequences.
    pub batch: usize,
    /// New query rows per sequence.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Query heads per kv head.
    pub groups: usize,
    /// Head dim (at most [`ATTEND_MAX_HEAD_DIM`]).
    pub dim: usize,
    /// Positions each cache buffer holds.
    pub capacity: usize,
    /// Position of the first query row; row `i` sees positions `0..=start + i`.
    pub start: usize,
    /// Score scale (`1 / sqrt(dim)`).
    pub scale: f32,
}

/// Attention of `q` `[batch, seq, heads, dim]` (rotated here with the tables `cos`, `sin` `[seq,
/// dim]`) over the cache buffers `[batch, heads / groups, capacity, dim]` into `out` `[batch,
/// seq, heads, dim]`.
pub fn launch_attend<R: Runtime>(
    client: &ComputeClient<R>,
    [q, cos, sin, keys, values, out]: [TensorArg<R>; 6],
    args: AttendArgs,
    dtype: StorageType,
) {
    assert!(
        args.dim <= ATTEND_MAX_HEAD_DIM,
        "head dim {} > {ATTEND_MAX_HEAD_DIM}",
        args.dim
    );
    attend::launch::<R>(
        client,
        CubeCount::Static(args.heads as u32, (args.batch * args.seq) as u32, 1),
        CubeDim::new_1d(THREADS),
        q,
        cos,
        sin,
        keys,
        values,
        out,
        args.seq as u32,
        args.groups as u32,
        args.capacity as u32,
        args.start as u32,
        args.scale,
        args.dim,
        dtype,
    );
}
