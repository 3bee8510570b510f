//! Products of a few rows with a weight matrix: decoding (one row) and self-speculative
//! verification (`d + 1` rows).
//!
//! Each output is a sum over the input features split into a fixed number of interleaved slices
//! (chosen from the weight's shape alone), each slice summed in order, the slices added in
//! order: a row's result is the same whether it is computed alone or with others. Rows go
//! through in passes of [`ROWS_PER_PASS`]; the weights stream from memory once per pass.

use cubecl::prelude::*;

/// Rows computed per pass over the weights.
pub const ROWS_PER_PASS: usize = 4;
/// Output columns per cube of [`rows_in_out`]; vocabulary rows per cube of [`rows_out_in`].
const TILE: u32 = 32;
const OUT_ROWS: u32 = 8;

/// `out[r, c] = Σ_k x[r, k] w[k, c]` for `w` `[k, n]` (Burn's `Linear` layout), `c < cols`.
/// Cube `(32, slices)`: x = a column of the tile (consecutive threads read consecutive weights),
/// y = the slice of features `≡ y (mod slices)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rows_in_out<F: Float>(
    x: &Tensor<F>,
    w: &Tensor<F>,
    out: &mut Tensor<F>,
    rows: u32,
    k_dim: u32,
    n_dim: u32,
    cols: u32,
    #[comptime] slices: usize,
    #[define(F)] _dtype: StorageType,
) {
    let lane = UNIT_POS_X as usize;
    let slice = UNIT_POS_Y as usize;
    let col = CUBE_POS_X as usize * TILE as usize + lane;
    let (m, k, n, c) = (rows as usize, k_dim as usize, n_dim as usize, cols as usize);
    let tile = TILE as usize;
    let mut partial = SharedMemory::<f32>::new(slices * ROWS_PER_PASS * TILE as usize);
    let mut r0 = 0usize;
    while r0 < m {
        // Rows past the end read the last row again; their sums are not stored.
        let x0 = min(r0, m - 1) * k;
        let x1 = min(r0 + 1, m - 1) * k;
        let x2 = min(r0 + 2, m - 1) * k;
        let x3 = min(r0 + 3, m - 1) * k;
        let (mut a0, mut a1, mut a2, mut a3) =
            (f32::new(0.0), f32::new(0.0), f32::new(0.0), f32::new(0.0));
        if col < c {
            let mut f = slice;
            while f < k {
                let wv = f32::cast_from(w[f * n + col]);
                a0 += f32::cast_from(x[x0 + f]) * wv;
                a1 += f32::cast_from(x[x1 + f]) * wv;
                a2 += f32::cast_from(x[x2 + f]) * wv;
                a3 += f32::cast_from(x[x3 + f]) * wv;
                f += slices;
            }
        }
        let at = slice * ROWS_PER_PASS * tile + lane;
        partial[at] = a0;
        partial[at + tile] = a1;
        partial[at + 2 * tile] = a2;
        partial[at + 3 * tile] = a3;
        sync_cube();
        // Thread row `y < 4` adds the slices of pass row `y`, in order.
        let r = r0 + slice;
        if slice < ROWS_PER_PASS && r < m && col < c {
            let mut sum = f32::new(0.0);
            for s in 0..slices {
                sum += partial[(s * ROWS_PER_PASS + slice) * tile + lane];
            }
            out[r * c + col] = F::cast_from(sum);
        }
        sync_cube();
        r0 += ROWS_PER_PASS;
    }
}

/// Feature slices for a `[k, n]` weight: more when few column tiles would keep few cubes busy.
fn slices_for(n: usize) -> usize {
    if n.div_ceil(TILE as usize) < 256 {
        32
    } else {
        8
    }
}

/// `x` `[rows, k]` times the weight `w` `[k, n]`, the first `cols` columns, into `out` `[rows,
/// cols]`.
#[allow(clippy::too_many_arguments)]
pub fn launch_rows_in_out<R: Runtime>(
    client: &ComputeClient<R>,
    x: TensorArg<R>,
    w: TensorArg<R>,
    out: TensorArg<R>,
    [rows, k, n]: [usize; 3],
    cols: usize,
    dtype: StorageType,
) {
    let slices = slices_for(n);
    rows_in_out::launch::<R>(
        client,
        CubeCount::Static(cols.div_ceil(TILE as usize) as u32, 1, 1),
        CubeDim::new_2d(TILE, slices as u32),
        x,
        w,
        out,
        rows as u32,
        k as u32,
        n as u32,
        cols as u32,
        slices,
        dtype,
    );
}

/// `out[r, v] = Σ_k x[r, k] e[v, k]` for `e` `[vocab, k]` (an embedding used as a tied head),
/// `v < cols`. Cube `(32, 8)`: y = one of 8 vocabulary rows, x = the features `≡ x (mod 32)`
/// (consecutive threads read consecutive weights), the 32 partial sums added by halving.
#[cube(launch)]
fn rows_out_in<F: Float>(
    x: &Tensor<F>,
    e: &Tensor<F>,
    out: &mut Tensor<F>,
    rows: u32,
    k_dim: u32,
    cols: u32,
    #[define(F)] _dtype: StorageType,
) {
    let lane = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let v = CUBE_POS_X as usize * OUT_ROWS as usize + y;
    let (m, k, c) = (rows as usize, k_dim as usize, cols as usize);
    let tile = TILE as usize;
    let mut partial = SharedMemory::<f32>::new(OUT_ROWS as usize * ROWS_PER_PASS * TILE as usize);
    let mut r0 = 0usize;
    while r0 < m {
        let x0 = min(r0, m - 1) * k;
        let x1 = min(r0 + 1, m - 1) * k;
        let x2 = min(r0 + 2, m - 1) * k;
        let x3 = min(r0 + 3, m - 1) * k;
        let (mut a0, mut a1, mut a2, mut a3) =
            (f32::new(0.0), f32::new(0.0), f32::new(0.0), f32::new(0.0));
        if v < c {
            let mut f = lane;
            while f < k {
                let ev = f32::cast_from(e[v * k + f]);
                a0 += f32::cast_from(x[x0 + f]) * ev;
                a1 += f32::cast_from(x[x1 + f]) * ev;
                a2 += f32::cast_from(x[x2 + f]) * ev;
                a3 += f32::cast_from(x[x3 + f]) * ev;
                f += tile;
            }
        }
        let at = y * ROWS_PER_PASS * tile + lane;
        partial[at] = a0;
        partial[at + tile] = a1;
        partial[at + 2 * tile] = a2;
        partial[at + 3 * tile] = a3;
        sync_cube();
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if lane < stride {
                for p in 0..ROWS_PER_PASS {
                    let i = (y * ROWS_PER_PASS + p) * tile + lane;
                    partial[i] += partial[i + stride];
                }
            }
            sync_cube();
            stride /= 2;
        }
        let r = r0 + lane;
        if lane < ROWS_PER_PASS && r < m && v < c {
            out[r * c + v] = F::cast_from(partial[(y * ROWS_PER_PASS + lane) * tile]);
        }
        sync_cube();
        r0 += ROWS_PER_PASS;
    }
}

/// `x` `[rows, k]` times the transposed embedding `e` `[vocab, k]`, the first `cols` vocabulary
/// rows, into `out` `[rows, cols]`.
pub fn launch_rows_out_in<R: Runtime>(
    client: &ComputeClient<R>,
    x: TensorArg<R>,
    e: TensorArg<R>,
    out: TensorArg<R>,
    [rows, k]: [usize; 2],
    cols: usize,
    dtype: StorageType,
) {
    rows_out_in::launch::<R>(
        client,
        CubeCount::Static(cols.div_ceil(OUT_ROWS as usize) as u32, 1, 1),
        CubeDim::new_2d(TILE, OUT_ROWS),
        x,
        e,
        out,
        rows as u32,
        k as u32,
        cols as u32,
        dtype,
    );
}
