//! CPU kernels on plain slices (AVX2 and FMA where the CPU has them, else the same order in
//! scalar code): what the Flex backend runs through the model's seam.

pub mod attend;
pub mod attention_train;
pub mod cross_entropy;
mod gemm;
mod gemm_bf16;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod rows;

use std::sync::OnceLock;

/// Options of the CPU kernels, fixed once per process, before the first product runs: the
/// program that embeds the kernels decides them (the `layerskip` binary from its environment,
/// `LAYERSKIP_THREADS`, `LAYERSKIP_PARALLEL_WORK`, `LAYERSKIP_KERNEL`); the library reads no
/// environment of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuOptions {
    /// Threads of the decoding kernels' [`pool::Pool`] (1: no helpers). Default: one per core
    /// the process may use, at most 16.
    pub threads: Option<usize>,
    /// Multiply-adds from which a product is split over the pool's threads. Default:
    /// [`rows::PARALLEL_WORK`].
    pub parallel_work: Option<usize>,
    /// The product kernel, if this CPU runs it (to measure one against another). Default: the
    /// widest this CPU runs.
    pub kernel: Option<rows::Kernel>,
}

static OPTIONS: OnceLock<CpuOptions> = OnceLock::new();

/// Fixes the kernels' options for this process. False, changing nothing, if they were fixed
/// already (by an earlier call, or by a kernel that ran first with the defaults).
pub fn configure(options: CpuOptions) -> bool {
    OPTIONS.set(options).is_ok()
}

/// The options in force (the defaults unless [`configure`] came first).
pub fn options() -> CpuOptions {
    *OPTIONS.get_or_init(CpuOptions::default)
}

/// `out = silu(gate) * up = gate / (1 + exp(-gate)) * up`, elementwise (slices of equal length),
/// with a vectorised exp. Each element is computed alone.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && out.len() == gate.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        unsafe { silu_mul_avx2(gate, up, out) };
        return;
    }
    for i in 0..gate.len() {
        out[i] = gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
    }
}

/// Rotary embedding of `x` `[batch, seq, heads, d]` with tables `cos`, `sin` `[seq, d]` in the
/// rotate-half layout: `x * cos + rotate_half(x) * sin`, elementwise in that order.
pub fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    out: &mut [f32],
    [batch, seq, heads, d]: [usize; 4],
) {
    let half = d / 2;
    for b in 0..batch {
        for t in 0..seq {
            let (c, s) = (&cos[t * d..(t + 1) * d], &sin[t * d..(t + 1) * d]);
            for h in 0..heads {
                let at = ((b * seq + t) * heads + h) * d;
                let (xr, or) = (&x[at..at + d], &mut out[at..at + d]);
                for i in 0..half {
                    or[i] = xr[i] * c[i] + -xr[i + half] * s[i];
                }
                for i in half..d {
                    or[i] = xr[i] * c[i] + xr[i - half] * s[i];
                }
            }
        }
    }
}

/// The gradients of [`silu_mul`]: with `s = sigmoid(gate)`, `d_up = dy * gate * s` and
/// `d_gate = dy * up * s * (1 + gate * (1 - s))`, elementwise (slices of equal length).
pub fn silu_mul_backward(
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
    d_gate: &mut [f32],
    d_up: &mut [f32],
) {
    let n = gate.len();
    assert!(up.len() == n && dy.len() == n && d_gate.len() == n && d_up.len() == n);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        unsafe { silu_mul_backward_avx2(gate, up, dy, d_gate, d_up) };
        return;
    }
    silu_mul_backward_scalar(gate, up, dy, d_gate, d_up, 0);
}

fn silu_mul_backward_scalar(
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
    d_gate: &mut [f32],
    d_up: &mut [f32],
    from: usize,
) {
    for i in from..gate.len() {
        let s = 1.0 / (1.0 + (-gate[i]).exp());
        d_up[i] = dy[i] * gate[i] * s;
        d_gate[i] = dy[i] * up[i] * s * (1.0 + gate[i] * (1.0 - s));
    }
}

/// [`silu_mul_backward`] with AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_backward_avx2(
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
    d_gate: &mut [f32],
    d_up: &mut [f32],
) {
    use std::arch::x86_64::*;
    let body = gate.len() / 8 * 8;
    // SAFETY: the offsets stay below `body <= len` of every slice (equal lengths, asserted by
    // the caller); the caller's promise covers the intrinsics.
    unsafe {
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < body {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let d = _mm256_loadu_ps(dy.as_ptr().add(i));
            let s = _mm256_div_ps(
                one,
                _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))),
            );
            _mm256_storeu_ps(
                d_up.as_mut_ptr().add(i),
                _mm256_mul_ps(d, _mm256_mul_ps(g, s)),
            );
            let slope = _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one);
            let du = _mm256_mul_ps(d, _mm256_loadu_ps(up.as_ptr().add(i)));
            _mm256_storeu_ps(
                d_gate.as_mut_ptr().add(i),
                _mm256_mul_ps(du, _mm256_mul_ps(s, slope)),
            );
            i += 8;
        }
    }
    silu_mul_backward_scalar(gate, up, dy, d_gate, d_up, body);
}

/// The gradient of [`rope`] with respect to `x`, given the gradient `dy` of its output: with
/// `h = d / 2`, `dx[i] = dy[i] cos[i] + dy[i + h] sin[i + h]` and
/// `dx[i + h] = dy[i + h] cos[i + h] - dy[i] sin[i]` (the rotation's transpose).
pub fn rope_backward(
    dy: &[f32],
    cos: &[f32],
    sin: &[f32],
    dx: &mut [f32],
    [batch, seq, heads, d]: [usize; 4],
) {
    let half = d / 2;
    assert!(dy.len() == batch * seq * heads * d && dx.len() == dy.len());
    for b in 0..batch {
        for t in 0..seq {
            let (c, s) = (&cos[t * d..(t + 1) * d], &sin[t * d..(t + 1) * d]);
            for h in 0..heads {
                let at = ((b * seq + t) * heads + h) * d;
                let (g, o) = (&dy[at..at + d], &mut dx[at..at + d]);
                for i in 0..half {
                    o[i] = g[i] * c[i] + g[i + half] * s[i + half];
                    o[i + half] = g[i + half] * c[i + half] - g[i] * s[i];
                }
            }
        }
    }
}

/// [`silu_mul`] with AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let body = gate.len() / 8 * 8;
    // SAFETY: the offsets stay below `body <= len`; the caller's promise covers the intrinsics.
    unsafe {
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < body {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            let r = _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), r);
            i += 8;
        }
    }
    for i in body..gate.len() {
        out[i] = gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
    }
}

/// `exp(x)` of eight lanes: Cephes' range reduction by `ln 2` and degree-5 polynomial, within
/// 2 ulp of `expf`; arguments below -87.3 give 0, above 88.37 give exp(88.37).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn exp256(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let lo = _mm256_set1_ps(-87.33654);
    let under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    // Above 88.37 the result would not fit: clamp to ~2.5e38 (SiLU only needs "huge").
    let x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.37));
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    ));
    _mm256_andnot_ps(under, _mm256_mul_ps(p, pow2))
}

/// Pseudo-random values in [-1, 1) for the kernels' tests (a 64-bit LCG, reproducible).
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::arch::x86_64::*;

    /// The vectorised exp against f64's: within 2 ulp from -87.3 to 88.37, 0 below, clamped
    /// above.
    #[test]
    fn exp256_is_within_two_ulp_of_exp() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let xs: Vec<f32> = (-80_000..=80_000).map(|i| -(i as f32) * 0.001_1).collect();
        for chunk in xs.chunks_exact(8) {
            let mut got = [0.0f32; 8];
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe {
                _mm256_storeu_ps(
                    got.as_mut_ptr(),
                    super::exp256(_mm256_loadu_ps(chunk.as_ptr())),
                )
            };
            for (&x, &g) in chunk.iter().zip(&got) {
                let want = (x as f64).exp();
                if x < -87.336_54 {
                    assert_eq!(g, 0.0, "exp({x})");
                } else if x > 88.37 {
                    assert_eq!(g, 88.37f32.exp(), "exp({x})");
                } else {
                    let ulp = f32::EPSILON as f64 * want;
                    assert!(
                        (g as f64 - want).abs() <= 2.0 * ulp,
                        "exp({x}) = {g}, want {want}"
                    );
                }
            }
        }
    }

    /// The fused SwiGLU product against `x * sigmoid(x) * u` in f64, with a tail past the
    /// last vector.
    #[test]
    fn silu_mul_matches_the_formula() {
        let n = 3 * 37;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 55.0) * 0.37).collect();
        let u: Vec<f32> = (0..n).map(|i| 1.5 - (i % 7) as f32 * 0.5).collect();
        let mut got = vec![0.0; n];
        super::silu_mul(&g, &u, &mut got);
        for i in 0..n {
            let (x, y) = (g[i] as f64, u[i] as f64);
            let want = x / (1.0 + (-x).exp()) * y;
            assert!(
                (got[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{i}: {} vs {want}",
                got[i]
            );
        }
    }
}
