//! The products for weights stored `[in, out]` (Burn's `Linear` layout): a thread reads a vector
//! of `N` consecutive output columns per load (16 bytes where the widths allow: 4 `f32`, 8
//! `bf16`), a cube's 32 lanes cover `32 N` columns, its thread rows split the input features.

use cubecl::prelude::*;

use super::{Epilogue, FusedRows, Pass, ROWS_PER_PASS, TILE, input, norm_factors, pass_at, twin};
use crate::cube::StoreAt;

/// Four rows' partial sums of a vector of columns.
#[derive(CubeType, Clone, Copy)]
struct Sums<N: Size> {
    s0: Vector<f32, N>,
    s1: Vector<f32, N>,
    s2: Vector<f32, N>,
    s3: Vector<f32, N>,
}

/// Zero sums.
#[cube]
fn zeros<N: Size>() -> Sums<N> {
    let zero = Vector::<f32, N>::new(f32::new(0.0));
    Sums::<N> {
        s0: zero,
        s1: zero,
        s2: zero,
        s3: zero,
    }
}

/// Pass row `p`'s sums.
#[cube]
fn row_of<N: Size>(sums: &Sums<N>, #[comptime] p: usize) -> Vector<f32, N> {
    if comptime!(p == 0) {
        sums.s0
    } else if comptime!(p == 1) {
        sums.s1
    } else if comptime!(p == 2) {
        sums.s2
    } else {
        sums.s3
    }
}

/// `sums.s_p += input(row p, f) * wv` (row 0 only when `single`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn add_feature<F: Float, N: Size>(
    sums: &mut Sums<N>,
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    pass: &Pass,
    f: usize,
    wv: Vector<f32, N>,
    #[comptime] norm: bool,
    #[comptime] single: bool,
) {
    sums.s0 += Vector::new(input::<F>(x, gamma, pass.x0, f, pass.inv0, norm)) * wv;
    if comptime!(!single) {
        sums.s1 += Vector::new(input::<F>(x, gamma, pass.x1, f, pass.inv1, norm)) * wv;
        sums.s2 += Vector::new(input::<F>(x, gamma, pass.x2, f, pass.inv2, norm)) * wv;
        sums.s3 += Vector::new(input::<F>(x, gamma, pass.x3, f, pass.inv3, norm)) * wv;
    }
}

/// Vector `i` of the weight of `segment` (uniform over a cube).
#[cube]
fn weight<F: Float, N: Size>(
    w0: &Tensor<Vector<F, N>>,
    w1: &Tensor<Vector<F, N>>,
    w2: &Tensor<Vector<F, N>>,
    segment: usize,
    i: usize,
) -> Vector<f32, N> {
    let mut v = Vector::<f32, N>::new(f32::new(0.0));
    if segment == 0usize {
        v = Vector::<f32, N>::cast_from(w0[i]);
    } else if segment == 1usize {
        v = Vector::<f32, N>::cast_from(w1[i]);
    } else if segment == 2usize {
        v = Vector::<f32, N>::cast_from(w2[i]);
    }
    v
}

/// The pass's sums for the column vector `col` of the weight of `segment` `[k, n]` (`nv = n / N`
/// vectors a row) over the features `≡ slice (mod slices)`, in order, four weight loads at a
/// time.
#[cube]
#[allow(clippy::too_many_arguments)]
fn column_sums<F: Float, N: Size>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    w0: &Tensor<Vector<F, N>>,
    w1: &Tensor<Vector<F, N>>,
    w2: &Tensor<Vector<F, N>>,
    segment: usize,
    pass: &Pass,
    k: usize,
    nv: usize,
    col: usize,
    slice: usize,
    #[comptime] slices: usize,
    #[comptime] norm: bool,
    #[comptime] single: bool,
) -> Sums<N> {
    let mut sums = zeros::<N>();
    let mut f = slice;
    while f + 3 * slices < k {
        let wa = weight::<F, N>(w0, w1, w2, segment, f * nv + col);
        let wb = weight::<F, N>(w0, w1, w2, segment, (f + slices) * nv + col);
        let wc = weight::<F, N>(w0, w1, w2, segment, (f + 2 * slices) * nv + col);
        let wd = weight::<F, N>(w0, w1, w2, segment, (f + 3 * slices) * nv + col);
        add_feature::<F, N>(&mut sums, x, gamma, pass, f, wa, norm, single);
        add_feature::<F, N>(&mut sums, x, gamma, pass, f + slices, wb, norm, single);
        add_feature::<F, N>(&mut sums, x, gamma, pass, f + 2 * slices, wc, norm, single);
        add_feature::<F, N>(&mut sums, x, gamma, pass, f + 3 * slices, wd, norm, single);
        f += 4 * slices;
    }
    while f < k {
        let wa = weight::<F, N>(w0, w1, w2, segment, f * nv + col);
        add_feature::<F, N>(&mut sums, x, gamma, pass, f, wa, norm, single);
        f += slices;
    }
    sums
}

/// The slices' sums of column `col * N + e` for thread row `e < N`, added in slice order: each
/// thread stashes its vector, thread row `e` adds element `e` of every slice's.
#[cube]
fn reduce<N: Size>(
    partial: &mut SharedMemory<f32>,
    v: Vector<f32, N>,
    lane: usize,
    slice: usize,
    #[comptime] slices: usize,
) -> f32 {
    let size = N::value();
    let tile = TILE as usize;
    #[unroll]
    for e in 0..size {
        partial[(slice * tile + lane) * size + e] = v[e];
    }
    sync_cube();
    let mut sum = f32::new(0.0);
    if slice < size {
        for s in 0..slices {
            sum += partial[(s * tile + lane) * size + slice];
        }
    }
    sync_cube();
    sum
}

/// The rotary embedding of the key in `columns[at]` (feature `j` of its head, position `t` of
/// the tables `[seq, dim]`), its partner feature `j ± dim/2` in the same head beside it: as
/// `store_kv` rotates it.
#[cube]
fn rotated_column<F: Float>(
    columns: &SharedMemory<f32>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    at: usize,
    t: usize,
    j: usize,
    dim: usize,
) -> f32 {
    let half = dim / 2;
    let mut partner = at + half;
    if j >= half {
        partner = at - half;
    }
    let mut rot = columns[partner];
    if j < half {
        rot = f32::new(0.0) - rot;
    }
    columns[at] * f32::cast_from(cos[t * dim + j]) + rot * f32::cast_from(sin[t * dim + j])
}

/// Products of `x` `[rows, k]` (RMSNorm'd with `gamma` first when `norm`) with up to three
/// weights `w_i` `[k, n_i]` (Burn's `Linear` layout, `n_i` a multiple of `N`), with an
/// [`Epilogue`]. Cube `(32, slices)`: x = a vector of `N` columns (consecutive threads read
/// consecutive vectors), y = the slice of features `≡ y (mod slices)`. Cubes `0..tiles(n0)`
/// compute `w0`'s columns, the next `w1`'s, then `w2`'s ([`Epilogue::Plain`]); with
/// [`Epilogue::SwiGlu`] each cube computes the same columns of `w0` and `w1`. With `store` (a
/// plain launch of q, k and v), `out1` and `out2` are the key and value caches `[batch,
/// kv_heads, capacity, head_dim]`: row `r` is position `at + r % seq` of sequence `r / seq`,
/// keys are rotated with `cos`/`sin` `[seq, head_dim]` (each cube's columns hold whole heads).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn fused_rows<F: Float, N: Size>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    residual: &Tensor<F>,
    w0: &Tensor<Vector<F, N>>,
    w1: &Tensor<Vector<F, N>>,
    w2: &Tensor<Vector<F, N>>,
    out0: &mut Tensor<F>,
    out1: &mut Tensor<F>,
    out2: &mut Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    rows: u32,
    k_dim: u32,
    n0: u32,
    n1: u32,
    n2: u32,
    eps: f32,
    seq: u32,
    head_dim: u32,
    capacity: u32,
    at: u32,
    #[comptime] slices: usize,
    #[comptime] norm: bool,
    #[comptime] epilogue: Epilogue,
    #[comptime] single: bool,
    #[comptime] store: bool,
    #[define(F)] _dtype: StorageType,
) {
    let size = N::value();
    let lane = UNIT_POS_X as usize;
    let slice = UNIT_POS_Y as usize;
    let tile_size = TILE as usize;
    let (m, k) = (rows as usize, k_dim as usize);
    let tiles0 = (n0 as usize / size).div_ceil(tile_size);
    let tiles1 = (n1 as usize / size).div_ceil(tile_size);
    let tile = CUBE_POS_X as usize;
    let mut segment: usize = 0;
    let mut local = tile;
    let mut n = n0 as usize;
    // Only a plain launch has cubes past the first weight's tiles.
    if tile >= tiles0 {
        segment = 1usize;
        local = tile - tiles0;
        n = n1 as usize;
        if local >= tiles1 {
            segment = 2usize;
            local -= tiles1;
            n = n2 as usize;
        }
    }
    let nv = n / size;
    let col = local * tile_size + lane;
    // Room for the vectors of every thread, and for four rows' norm sums of every thread.
    let mut partial = SharedMemory::<f32>::new(comptime!(
        slices * TILE as usize * usize::max(size, ROWS_PER_PASS)
    ));
    // A row of the cube's columns, for the keys' rotation (their rope partners in one place).
    let mut columns =
        SharedMemory::<f32>::new(comptime!(if store { TILE as usize * size } else { 1 }));
    let rows_per_pass = comptime!(if single { 1 } else { ROWS_PER_PASS });
    let mut r0 = 0usize;
    while r0 < m {
        let mut pass = pass_at(r0, m, k);
        if norm {
            norm_factors::<F>(x, &mut partial, &mut pass, k, eps, single);
        }
        let live = col < nv;
        // Threads past the last column compute the last one again and store nothing.
        let c = min(col, nv - 1);
        if comptime!(epilogue == Epilogue::SwiGlu) {
            let gate = column_sums::<F, N>(
                x, gamma, w0, w0, w0, 0usize, &pass, k, nv, c, slice, slices, norm, single,
            );
            let up = column_sums::<F, N>(
                x, gamma, w1, w1, w1, 0usize, &pass, k, nv, c, slice, slices, norm, single,
            );
            // Pass row `p`: thread row `e < N` finishes column `col * N + e`.
            #[unroll]
            for p in 0..rows_per_pass {
                let g = reduce::<N>(&mut partial, row_of::<N>(&gate, p), lane, slice, slices);
                let u = reduce::<N>(&mut partial, row_of::<N>(&up, p), lane, slice, slices);
                let r = r0 + p;
                if slice < size && r < m && live {
                    let g = f32::cast_from(F::cast_from(g));
                    let u = f32::cast_from(F::cast_from(u));
                    out0[r * n + col * size + slice] =
                        F::cast_from(g / (f32::new(1.0) + f32::exp(f32::new(0.0) - g)) * u);
                }
            }
        } else {
            let sums = column_sums::<F, N>(
                x, gamma, w0, w1, w2, segment, &pass, k, nv, c, slice, slices, norm, single,
            );
            #[unroll]
            for p in 0..rows_per_pass {
                let sum = F::cast_from(reduce::<N>(
                    &mut partial,
                    row_of::<N>(&sums, p),
                    lane,
                    slice,
                    slices,
                ));
                let r = r0 + p;
                if comptime!(store) {
                    let at_column = lane * size + slice;
                    if slice < size {
                        columns[at_column] = f32::cast_from(sum);
                    }
                    sync_cube();
                    if slice < size && r < m && live {
                        let c = col * size + slice;
                        let (s, d) = (seq as usize, head_dim as usize);
                        let (b, t, j) = (r / s, r % s, c % d);
                        if segment == 0usize {
                            out0[r * n + c] = sum;
                        } else {
                            let kv_heads = n / d;
                            let dst =
                                ((b * kv_heads + c / d) * capacity as usize + at as usize + t) * d
                                    + j;
                            if segment == 1usize {
                                let rotated =
                                    rotated_column::<F>(&columns, cos, sin, at_column, t, j, d);
                                out1[dst] = F::cast_from(rotated);
                            } else {
                                out2[dst] = sum;
                            }
                        }
                    }
                    sync_cube();
                } else if slice < size && r < m && live {
                    let at = r * n + col * size + slice;
                    if comptime!(epilogue == Epilogue::Residual) {
                        out0[at] = sum + residual[at];
                    } else if segment == 0usize {
                        out0[at] = sum;
                    } else if segment == 1usize {
                        out1[at] = sum;
                    } else {
                        out2[at] = sum;
                    }
                }
            }
        }
        r0 += rows_per_pass;
    }
}

/// Feature slices for weights of `tiles` column tiles in all: more when few tiles would keep
/// few cubes busy.
fn slices_for(tiles: usize) -> usize {
    if tiles < 256 { 32 } else { 8 }
}

/// The widest vector (in elements) that the client loads well for this dtype and that divides
/// every width.
fn vector_size<R: Runtime>(
    client: &ComputeClient<R>,
    widths: [usize; 3],
    dtype: StorageType,
) -> usize {
    client
        .io_optimized_vector_sizes(dtype.size())
        .find(|&v| v <= 8 && widths.iter().all(|w| w % v == 0))
        .unwrap_or(1)
}

/// Runs `fused_rows`: `rows` rows of `k` features; `widths` the weights' output widths (0 for
/// absent ones); `eps` the RMSNorm epsilon when the input is to be normalised.
pub fn launch_fused_rows<R: Runtime>(
    client: &ComputeClient<R>,
    tensors: FusedRows<R>,
    [rows, k]: [usize; 2],
    widths: [usize; 3],
    eps: Option<f32>,
    epilogue: Epilogue,
    dtype: StorageType,
) {
    // Bound to the input, not read.
    let rope = [twin(&tensors.x), twin(&tensors.x)];
    let cache = [rows, 0, 0, 0];
    launch(
        client,
        (tensors, rope, false),
        [rows, k],
        widths,
        eps,
        epilogue,
        cache,
        dtype,
    );
}

/// The attention inputs of `rows = batch * seq` rows with the keys and values stored: `x` `[rows,
/// k]` RMSNorm'd with `gamma` (when `eps` is given) times the q, k and v weights, the queries to
/// `queries` `[rows, n_q]`, the keys rotated with the tables `[seq, head_dim]` and written with
/// the values into the cache buffers `[batch, kv_heads, capacity, head_dim]` at `to.at..` (as
/// [`launch_store_kv`](crate::cube::launch_store_kv) writes them). `tensors.outputs` other than the
/// first are not used. False, launching nothing, where a cube's columns would not hold whole
/// heads (see [`stores_whole_heads`]).
#[allow(clippy::too_many_arguments)]
pub fn launch_fused_qkv_store<R: Runtime>(
    client: &ComputeClient<R>,
    tensors: FusedRows<R>,
    [cos, sin]: [TensorArg<R>; 2],
    to: StoreAt<R>,
    [batch, seq, k]: [usize; 3],
    head_dim: usize,
    widths: [usize; 3],
    eps: Option<f32>,
    dtype: StorageType,
) -> bool {
    if !stores_whole_heads(client, widths, dtype, head_dim) {
        return false;
    }
    let cache = [seq, head_dim, to.capacity, to.at];
    let tensors = FusedRows {
        outputs: {
            let [queries, _, _] = tensors.outputs;
            [queries, to.key_cache, to.value_cache]
        },
        ..tensors
    };
    let shape = [batch * seq, k];
    let rope = [cos, sin];
    launch(
        client,
        (tensors, rope, true),
        shape,
        widths,
        eps,
        Epilogue::Plain,
        cache,
        dtype,
    );
    true
}

/// Whether [`launch_fused_qkv_store`] takes these widths (q, k, v) and heads: each cube's
/// columns hold whole heads of the keys, so a key's rope partner is computed beside it.
pub fn stores_whole_heads<R: Runtime>(
    client: &ComputeClient<R>,
    widths: [usize; 3],
    dtype: StorageType,
    head_dim: usize,
) -> bool {
    let columns = TILE as usize * vector_size(client, widths, dtype);
    head_dim > 0
        && head_dim.is_multiple_of(2)
        && columns.is_multiple_of(head_dim)
        && widths[1] == widths[2]
        && widths[1].is_multiple_of(head_dim)
}

/// One [`fused_rows`] launch; `store` when the second and third outputs are the cache buffers,
/// `cache` = `[seq, head_dim, capacity, at]` then.
#[allow(clippy::too_many_arguments)]
fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    (tensors, [cos, sin], store): (FusedRows<R>, [TensorArg<R>; 2], bool),
    [rows, k]: [usize; 2],
    widths: [usize; 3],
    eps: Option<f32>,
    epilogue: Epilogue,
    [seq, head_dim, capacity, at]: [usize; 4],
    dtype: StorageType,
) {
    let size = vector_size(client, widths, dtype);
    let tile = TILE as usize * size;
    let tiles = match epilogue {
        Epilogue::Plain => widths.iter().map(|w| w.div_ceil(tile)).sum(),
        _ => widths[0].div_ceil(tile),
    };
    let slices = slices_for(tiles);
    let FusedRows {
        x,
        gamma,
        residual,
        weights: [w0, w1, w2],
        outputs: [o0, o1, o2],
    } = tensors;
    fused_rows::launch::<R>(
        client,
        CubeCount::Static(tiles as u32, 1, 1),
        CubeDim::new_2d(TILE, slices as u32),
        size,
        x,
        gamma,
        residual,
        w0,
        w1,
        w2,
        o0,
        o1,
        o2,
        cos,
        sin,
        rows as u32,
        k as u32,
        widths[0] as u32,
        widths[1] as u32,
        widths[2] as u32,
        eps.unwrap_or(0.0),
        seq as u32,
        head_dim as u32,
        capacity as u32,
        at as u32,
        slices,
        eps.is_some(),
        epilogue,
        rows == 1,
        store,
        dtype,
    );
}
