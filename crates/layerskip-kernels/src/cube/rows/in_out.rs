//! The products for weights stored `[in, out]` (Burn's `Linear` layout): a cube computes 32
//! output columns, its threads' rows splitting the input features.

use cubecl::prelude::*;

use super::{
    Epilogue, FusedRows, Pass, ROWS_PER_PASS, Sums, TILE, add_feature, gather, norm_factors,
    pass_at, stash,
};

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
