//! Products of a few rows with weight matrices: decoding (one row) and self-speculative
//! verification (`d + 1` rows), with what surrounds them in a decoder layer fused in, so that a
//! layer is six launches: RMSNorm of the input computed on the fly, up to three weights in one
//! launch (q, k and v), and an epilogue that adds the residual or forms SwiGLU's product.
//!
//! Each output is a sum over the input features split into a fixed number of interleaved slices
//! (chosen from the weights' shapes alone), each slice summed in order, the slices added in
//! order; each row's RMSNorm is a fixed-order sum too. A row's result is the same whether it is
//! computed alone or with others. Rows go through in passes of [`ROWS_PER_PASS`]; the weights
//! stream from memory once per pass, four loads in flight per thread.

use cubecl::prelude::*;

/// Rows computed per pass over the weights.
pub const ROWS_PER_PASS: usize = 4;
/// Output columns per cube of [`fused_rows`]; vocabulary rows per cube of [`rows_out_in`].
const TILE: u32 = 32;
const OUT_ROWS: u32 = 8;

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
struct Pass {
    x0: usize,
    x1: usize,
    x2: usize,
    x3: usize,
    inv0: f32,
    inv1: f32,
    inv2: f32,
    inv3: f32,
}

/// Four rows' partial sums.
#[derive(CubeType, Clone, Copy)]
struct Sums {
    s0: f32,
    s1: f32,
    s2: f32,
    s3: f32,
}

/// The pass over rows `r0..r0 + 4` of `m` rows of `k` features, not normalised. Rows past the
/// end read the last row again; their sums are not stored.
#[cube]
fn pass_at(r0: usize, m: usize, k: usize) -> Pass {
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
fn input<F: Float>(
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

/// `sums.s_p += input(row p, f) * wv`.
#[cube]
fn add_feature<F: Float>(
    sums: &mut Sums,
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    pass: &Pass,
    f: usize,
    wv: f32,
    #[comptime] norm: bool,
) {
    sums.s0 += input::<F>(x, gamma, pass.x0, f, pass.inv0, norm) * wv;
    sums.s1 += input::<F>(x, gamma, pass.x1, f, pass.inv1, norm) * wv;
    sums.s2 += input::<F>(x, gamma, pass.x2, f, pass.inv2, norm) * wv;
    sums.s3 += input::<F>(x, gamma, pass.x3, f, pass.inv3, norm) * wv;
}

/// The pass's sums for column `col` of `w` `[k, n]` over the features `≡ slice (mod slices)`,
/// in order, four weight loads at a time.
#[cube]
#[allow(clippy::too_many_arguments)]
fn column_sums<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    w: &Tensor<F>,
    pass: &Pass,
    k: usize,
    n: usize,
    col: usize,
    slice: usize,
    #[comptime] slices: usize,
    #[comptime] norm: bool,
) -> Sums {
    let mut sums = Sums {
        s0: f32::new(0.0),
        s1: f32::new(0.0),
        s2: f32::new(0.0),
        s3: f32::new(0.0),
    };
    let mut f = slice;
    while f + 3 * slices < k {
        let wa = f32::cast_from(w[f * n + col]);
        let wb = f32::cast_from(w[(f + slices) * n + col]);
        let wc = f32::cast_from(w[(f + 2 * slices) * n + col]);
        let wd = f32::cast_from(w[(f + 3 * slices) * n + col]);
        add_feature::<F>(&mut sums, x, gamma, pass, f, wa, norm);
        add_feature::<F>(&mut sums, x, gamma, pass, f + slices, wb, norm);
        add_feature::<F>(&mut sums, x, gamma, pass, f + 2 * slices, wc, norm);
        add_feature::<F>(&mut sums, x, gamma, pass, f + 3 * slices, wd, norm);
        f += 4 * slices;
    }
    while f < k {
        let wa = f32::cast_from(w[f * n + col]);
        add_feature::<F>(&mut sums, x, gamma, pass, f, wa, norm);
        f += slices;
    }
    sums
}

/// Stores four rows' sums at `partial[(base + p) * TILE + lane]`.
#[cube]
fn stash(partial: &mut SharedMemory<f32>, sums: &Sums, base: usize, lane: usize) {
    let tile = TILE as usize;
    partial[base * tile + lane] = sums.s0;
    partial[(base + 1) * tile + lane] = sums.s1;
    partial[(base + 2) * tile + lane] = sums.s2;
    partial[(base + 3) * tile + lane] = sums.s3;
}

/// The slices' sums of pass row `p` (stashed at `(s * stride + offset + p)`), added in order.
#[cube]
fn gather(
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
fn norm_factors<F: Float>(
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

/// Products of `x` `[rows, k]` (RMSNorm'd with `gamma` first when `norm`) with up to three
/// weights `w_i` `[k, n_i]` (Burn's `Linear` layout), with an [`Epilogue`]. Cube `(32,
/// slices)`: x = a column of the tile (consecutive threads read consecutive weights), y = the
/// slice of features `≡ y (mod slices)`. Cubes `0..tiles(n0)` compute `w0`'s columns, the next
/// `w1`'s, then `w2`'s ([`Epilogue::Plain`]); with [`Epilogue::SwiGlu`] each cube computes the
/// same columns of `w0` and `w1`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn fused_rows<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    residual: &Tensor<F>,
    w0: &Tensor<F>,
    w1: &Tensor<F>,
    w2: &Tensor<F>,
    out0: &mut Tensor<F>,
    out1: &mut Tensor<F>,
    out2: &mut Tensor<F>,
    rows: u32,
    k_dim: u32,
    n0: u32,
    n1: u32,
    n2: u32,
    eps: f32,
    #[comptime] slices: usize,
    #[comptime] norm: bool,
    #[comptime] epilogue: Epilogue,
    #[define(F)] _dtype: StorageType,
) {
    let lane = UNIT_POS_X as usize;
    let slice = UNIT_POS_Y as usize;
    let tile_size = TILE as usize;
    let (m, k) = (rows as usize, k_dim as usize);
    let tiles0 = (n0 as usize).div_ceil(tile_size);
    let tiles1 = (n1 as usize).div_ceil(tile_size);
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
    let col = local * tile_size + lane;
    let halves = comptime!(if epilogue == Epilogue::SwiGlu { 2 } else { 1 });
    let mut partial = SharedMemory::<f32>::new(slices * ROWS_PER_PASS * TILE as usize * halves);
    let mut r0 = 0usize;
    while r0 < m {
        let mut pass = pass_at(r0, m, k);
        if norm {
            norm_factors::<F>(x, &mut partial, &mut pass, k, eps);
        }
        let live = col < n;
        let at = slice * ROWS_PER_PASS * halves;
        if live {
            if segment == 0usize {
                let sums = column_sums::<F>(x, gamma, w0, &pass, k, n, col, slice, slices, norm);
                stash(&mut partial, &sums, at, lane);
            } else if segment == 1usize {
                let sums = column_sums::<F>(x, gamma, w1, &pass, k, n, col, slice, slices, norm);
                stash(&mut partial, &sums, at, lane);
            } else {
                let sums = column_sums::<F>(x, gamma, w2, &pass, k, n, col, slice, slices, norm);
                stash(&mut partial, &sums, at, lane);
            }
            if comptime!(epilogue == Epilogue::SwiGlu) {
                let up = column_sums::<F>(x, gamma, w1, &pass, k, n, col, slice, slices, norm);
                stash(&mut partial, &up, at + ROWS_PER_PASS, lane);
            }
        }
        sync_cube();
        // Thread row `y < 4` finishes pass row `y`.
        let r = r0 + slice;
        if slice < ROWS_PER_PASS && r < m && live {
            let stride = ROWS_PER_PASS * halves;
            let sum = F::cast_from(gather(&partial, slice, lane, stride, 0, slices));
            let at = r * n + col;
            if comptime!(epilogue == Epilogue::Residual) {
                out0[at] = sum + residual[at];
            } else if comptime!(epilogue == Epilogue::SwiGlu) {
                let g = f32::cast_from(sum);
                let up = gather(&partial, slice, lane, stride, ROWS_PER_PASS, slices);
                let u = f32::cast_from(F::cast_from(up));
                out0[at] = F::cast_from(g / (f32::new(1.0) + f32::exp(f32::new(0.0) - g)) * u);
            } else if segment == 0usize {
                out0[at] = sum;
            } else if segment == 1usize {
                out1[at] = sum;
            } else {
                out2[at] = sum;
            }
        }
        sync_cube();
        r0 += ROWS_PER_PASS;
    }
}

/// Feature slices for weights of `tiles` column tiles in all: more when few tiles would keep
/// few cubes busy.
fn slices_for(tiles: usize) -> usize {
    if tiles < 256 { 32 } else { 8 }
}

/// The tensors of a [`launch_fused_rows`] call. Unused inputs and outputs take any tensor of
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

/// Runs [`fused_rows`]: `rows` rows of `k` features; `widths` the weights' output widths (0 for
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
    let tile = TILE as usize;
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
        x,
        gamma,
        residual,
        w0,
        w1,
        w2,
        o0,
        o1,
        o2,
        rows as u32,
        k as u32,
        widths[0] as u32,
        widths[1] as u32,
        widths[2] as u32,
        eps.unwrap_or(0.0),
        slices,
        eps.is_some(),
        epilogue,
        dtype,
    );
}

/// `out[r, v] = Σ_k x[r, k] e[v, k]` for `e` `[vocab, k]` (an embedding used as a tied head),
/// `v < cols`, the input RMSNorm'd first when `norm`. Cube `(32, 8)`: y = one of 8 vocabulary
/// rows, x = the features `≡ x (mod 32)` (consecutive threads read consecutive weights), the 32
/// partial sums added by halving.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rows_out_in<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    e: &Tensor<F>,
    out: &mut Tensor<F>,
    rows: u32,
    k_dim: u32,
    cols: u32,
    eps: f32,
    #[comptime] norm: bool,
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
        let mut pass = pass_at(r0, m, k);
        if norm {
            norm_factors::<F>(x, &mut partial, &mut pass, k, eps);
        }
        let mut sums = Sums {
            s0: f32::new(0.0),
            s1: f32::new(0.0),
            s2: f32::new(0.0),
            s3: f32::new(0.0),
        };
        if v < c {
            let mut f = lane;
            while f + 3 * tile < k {
                let ea = f32::cast_from(e[v * k + f]);
                let eb = f32::cast_from(e[v * k + f + tile]);
                let ec = f32::cast_from(e[v * k + f + 2 * tile]);
                let ed = f32::cast_from(e[v * k + f + 3 * tile]);
                add_feature::<F>(&mut sums, x, gamma, &pass, f, ea, norm);
                add_feature::<F>(&mut sums, x, gamma, &pass, f + tile, eb, norm);
                add_feature::<F>(&mut sums, x, gamma, &pass, f + 2 * tile, ec, norm);
                add_feature::<F>(&mut sums, x, gamma, &pass, f + 3 * tile, ed, norm);
                f += 4 * tile;
            }
            while f < k {
                let ea = f32::cast_from(e[v * k + f]);
                add_feature::<F>(&mut sums, x, gamma, &pass, f, ea, norm);
                f += tile;
            }
        }
        stash(&mut partial, &sums, y * ROWS_PER_PASS, lane);
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

/// `x` `[rows, k]` (RMSNorm'd with `gamma` when `eps` is given) times the transposed embedding
/// `e` `[vocab, k]`, the first `cols` vocabulary rows, into `out` `[rows, cols]`.
#[allow(clippy::too_many_arguments)]
pub fn launch_rows_out_in<R: Runtime>(
    client: &ComputeClient<R>,
    [x, gamma, e, out]: [TensorArg<R>; 4],
    [rows, k]: [usize; 2],
    cols: usize,
    eps: Option<f32>,
    dtype: StorageType,
) {
    rows_out_in::launch::<R>(
        client,
        CubeCount::Static(cols.div_ceil(OUT_ROWS as usize) as u32, 1, 1),
        CubeDim::new_2d(TILE, OUT_ROWS),
        x,
        gamma,
        e,
        out,
        rows as u32,
        k as u32,
        cols as u32,
        eps.unwrap_or(0.0),
        eps.is_some(),
        dtype,
    );
}
