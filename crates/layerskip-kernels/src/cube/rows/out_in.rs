//! The products for weights stored `[out, in]` (Hugging Face's layout, and an embedding read as a
//! tied head): a cube computes 8 outputs, one warp per output reading its weight row
//! contiguously, the warp's 32 partial sums added by halving.

use cubecl::prelude::*;

use super::{
    Epilogue, FusedRows, OUT_ROWS, Pass, ROWS_PER_PASS, Sums, TILE, add_feature, norm_factors,
    pass_at, pass_rows, stash,
};

/// The pass's sums for output `v` of `w` `[n, k]` over the features `≡ lane (mod 32)`, in
/// order, four weight loads at a time.
#[cube]
fn row_sums<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    w: &Tensor<F>,
    pass: &Pass,
    k: usize,
    v: usize,
    lane: usize,
    #[comptime] norm: bool,
    #[comptime] single: bool,
) -> Sums {
    let tile = TILE as usize;
    let mut sums = Sums {
        s0: f32::new(0.0),
        s1: f32::new(0.0),
        s2: f32::new(0.0),
        s3: f32::new(0.0),
    };
    let row = v * k;
    let mut f = lane;
    while f + 3 * tile < k {
        let wa = f32::cast_from(w[row + f]);
        let wb = f32::cast_from(w[row + f + tile]);
        let wc = f32::cast_from(w[row + f + 2 * tile]);
        let wd = f32::cast_from(w[row + f + 3 * tile]);
        add_feature::<F>(&mut sums, x, gamma, pass, f, wa, norm, single);
        add_feature::<F>(&mut sums, x, gamma, pass, f + tile, wb, norm, single);
        add_feature::<F>(&mut sums, x, gamma, pass, f + 2 * tile, wc, norm, single);
        add_feature::<F>(&mut sums, x, gamma, pass, f + 3 * tile, wd, norm, single);
        f += 4 * tile;
    }
    while f < k {
        let wa = f32::cast_from(w[row + f]);
        add_feature::<F>(&mut sums, x, gamma, pass, f, wa, norm, single);
        f += tile;
    }
    sums
}

/// [`super::in_out`]'s products for weights `w_i` `[n_i, k]`: cubes `0..blocks(n0)` compute
/// `w0`'s outputs, 8 per cube, then `w1`'s and `w2`'s ([`Epilogue::Plain`]); with
/// [`Epilogue::SwiGlu`] each cube computes the same outputs of `w0` and `w1`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn fused_out_in<F: Float>(
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
    #[comptime] norm: bool,
    #[comptime] epilogue: Epilogue,
    #[comptime] single: bool,
    #[define(F)] _dtype: StorageType,
) {
    let lane = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let tile = TILE as usize;
    let per_cube = OUT_ROWS as usize;
    let (m, k) = (rows as usize, k_dim as usize);
    let blocks0 = (n0 as usize).div_ceil(per_cube);
    let blocks1 = (n1 as usize).div_ceil(per_cube);
    let block = CUBE_POS_X as usize;
    let mut segment: usize = 0;
    let mut local = block;
    let mut n = n0 as usize;
    // Only a plain launch has cubes past the first weight's outputs.
    if block >= blocks0 {
        segment = 1usize;
        local = block - blocks0;
        n = n1 as usize;
        if local >= blocks1 {
            segment = 2usize;
            local -= blocks1;
            n = n2 as usize;
        }
    }
    let v = local * per_cube + y;
    let halves = comptime!(if epilogue == Epilogue::SwiGlu { 2 } else { 1 });
    let mut partial =
        SharedMemory::<f32>::new(OUT_ROWS as usize * ROWS_PER_PASS * TILE as usize * halves);
    let mut r0 = 0usize;
    while r0 < m {
        let mut pass = pass_at(r0, m, k);
        if norm {
            norm_factors::<F>(x, &mut partial, &mut pass, k, eps, single);
        }
        let live = v < n;
        let at = y * ROWS_PER_PASS * halves;
        // A cube row's lanes all compute the same output, so an output past the end is nobody's.
        if live {
            if segment == 0usize {
                let sums = row_sums::<F>(x, gamma, w0, &pass, k, v, lane, norm, single);
                stash(&mut partial, &sums, at, lane, single);
            } else if segment == 1usize {
                let sums = row_sums::<F>(x, gamma, w1, &pass, k, v, lane, norm, single);
                stash(&mut partial, &sums, at, lane, single);
            } else {
                let sums = row_sums::<F>(x, gamma, w2, &pass, k, v, lane, norm, single);
                stash(&mut partial, &sums, at, lane, single);
            }
            if comptime!(epilogue == Epilogue::SwiGlu) {
                let up = row_sums::<F>(x, gamma, w1, &pass, k, v, lane, norm, single);
                stash(&mut partial, &up, at + ROWS_PER_PASS, lane, single);
            }
        }
        sync_cube();
        let mut stride = CUBE_DIM_X as usize / 2;
        while stride > 0 {
            if lane < stride {
                for p in 0..comptime!(pass_rows(single)) {
                    let i = (at + p) * tile + lane;
                    partial[i] += partial[i + stride];
                    if comptime!(epilogue == Epilogue::SwiGlu) {
                        let j = (at + ROWS_PER_PASS + p) * tile + lane;
                        partial[j] += partial[j + stride];
                    }
                }
            }
            sync_cube();
            stride /= 2;
        }
        // Lane `p` finishes pass row `p`.
        let r = r0 + lane;
        if lane < comptime!(pass_rows(single)) && r < m && live {
            let sum = F::cast_from(partial[(at + lane) * tile]);
            let o = r * n + v;
            if comptime!(epilogue == Epilogue::Residual) {
                out0[o] = sum + residual[o];
            } else if comptime!(epilogue == Epilogue::SwiGlu) {
                let g = f32::cast_from(sum);
                let u = f32::cast_from(F::cast_from(partial[(at + ROWS_PER_PASS + lane) * tile]));
                out0[o] = F::cast_from(g / (f32::new(1.0) + f32::exp(f32::new(0.0) - g)) * u);
            } else if segment == 0usize {
                out0[o] = sum;
            } else if segment == 1usize {
                out1[o] = sum;
            } else {
                out2[o] = sum;
            }
        }
        sync_cube();
        r0 += comptime!(pass_rows(single));
    }
}

/// Runs `fused_out_in`: `rows` rows of `k` features; `widths` the outputs per weight (the
/// weights' rows; fewer than a weight has reads its first rows only, as a vocabulary prefix of a
/// tied head does; 0 for absent weights); `eps` the RMSNorm epsilon when the input is to be
/// normalised.
pub fn launch_fused_out_in<R: Runtime>(
    client: &ComputeClient<R>,
    tensors: FusedRows<R>,
    [rows, k]: [usize; 2],
    widths: [usize; 3],
    eps: Option<f32>,
    epilogue: Epilogue,
    dtype: StorageType,
) {
    let per_cube = OUT_ROWS as usize;
    let blocks: usize = match epilogue {
        Epilogue::Plain => widths.iter().map(|w| w.div_ceil(per_cube)).sum(),
        _ => widths[0].div_ceil(per_cube),
    };
    let FusedRows {
        x,
        gamma,
        residual,
        weights: [w0, w1, w2],
        outputs: [o0, o1, o2],
    } = tensors;
    fused_out_in::launch::<R>(
        client,
        CubeCount::Static(blocks as u32, 1, 1),
        CubeDim::new_2d(TILE, OUT_ROWS),
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
        eps.is_some(),
        epilogue,
        rows == 1,
        dtype,
    );
}
