//! A bias-free linear layer's three training products over row-major f32 slices: the forward
//! `y = x · W` and the backward `dx = dy · Wᵀ`, `dW = xᵀ · dy`, with the transposes read in
//! place. [`Operands::Bf16`] rounds each product's operands to bf16 and accumulates in f32
//! (mixed precision: activations, weights and gradients stay f32). On every core; the results do
//! not depend on the thread count.

use super::gemm::{self, Mat, Threads};
use super::gemm_bf16::{self, PackedRhs, RoundedRhs};

/// The precision of the products' operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operands {
    /// f32 operands and accumulation.
    F32,
    /// Operands rounded to bf16, f32 accumulation: AVX512-BF16's products where the CPU has
    /// them ([`bf16_native`]), else the f32 GEMM on operands rounded first (the same products,
    /// summed in another order; about the speed of [`Operands::F32`]).
    Bf16,
}

/// Whether this CPU multiplies [`Operands::Bf16`] with AVX512-BF16's instructions (about twice
/// the f32 products' speed); where not, bf16 operands take the f32 GEMM.
pub fn bf16_native() -> bool {
    gemm_bf16::available()
}

/// The shape of a linear layer's products: `x` `[rows, inputs]`, `W` `[inputs, outputs]`.
#[derive(Debug, Clone, Copy)]
pub struct LinearShape {
    /// Rows of `x` (positions).
    pub rows: usize,
    /// Width of `x`.
    pub inputs: usize,
    /// Width of `y`.
    pub outputs: usize,
}

/// `y = x · W` into `y` `[rows, outputs]`.
///
/// # Panics
/// If a slice is shorter than its shape.
pub fn forward(y: &mut [f32], x: &[f32], w: &[f32], shape: LinearShape, operands: Operands) {
    let LinearShape {
        rows,
        inputs: k,
        outputs: n,
    } = shape;
    let w = Rhs::new(Mat::new(w, n, 1), k, n, operands);
    w.multiply(y, n, false, Mat::new(x, k, 1), rows, Threads::All);
}

/// `dx = dy · Wᵀ` into `dx` `[rows, inputs]` and `dW = xᵀ · dy` into `dw` `[inputs, outputs]`
/// (both overwritten).
///
/// # Panics
/// As [`forward`].
pub fn backward(
    dx: &mut [f32],
    dw: &mut [f32],
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    shape: LinearShape,
    operands: Operands,
) {
    let LinearShape {
        rows,
        inputs: k,
        outputs: n,
    } = shape;
    let (x, w, dy) = (Mat::new(x, k, 1), Mat::new(w, n, 1), Mat::new(dy, n, 1));
    let wt = Rhs::new(w.t(), n, k, operands);
    wt.multiply(dx, k, false, dy, rows, Threads::All);
    Rhs::new(dy, rows, n, operands).multiply(dw, n, false, x.t(), k, Threads::All);
}

/// The right operand `[k, n]` of products in a given precision: read in place (f32), packed
/// once for any number of products (bf16 on AVX512-BF16), or rounded once (bf16 elsewhere).
pub(crate) enum Rhs<'a> {
    F32 { rhs: Mat<'a>, k: usize, n: usize },
    Bf16(PackedRhs),
    Bf16Rounded(RoundedRhs),
}

impl<'a> Rhs<'a> {
    pub(crate) fn new(rhs: Mat<'a>, k: usize, n: usize, operands: Operands) -> Self {
        match operands {
            Operands::F32 => Self::F32 { rhs, k, n },
            Operands::Bf16 if gemm_bf16::available() => Self::Bf16(PackedRhs::new(rhs, k, n)),
            Operands::Bf16 => Self::Bf16Rounded(RoundedRhs::new(rhs, k, n)),
        }
    }

    /// `dst [m, n] (+)= lhs [m, k] · self`, `dst` row-major with row stride `ld`.
    pub(crate) fn multiply(
        &self,
        dst: &mut [f32],
        ld: usize,
        accumulate: bool,
        lhs: Mat,
        m: usize,
        threads: Threads,
    ) {
        match self {
            Self::F32 { rhs, k, n } => {
                gemm::product(dst, ld, accumulate, lhs, *rhs, [m, *n, *k], threads)
            }
            Self::Bf16(rhs) => gemm_bf16::product(dst, ld, accumulate, lhs, rhs, m, threads),
            Self::Bf16Rounded(rhs) => {
                gemm_bf16::product_rounded(dst, ld, accumulate, lhs, rhs, m, threads)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu::test_values as values;

    /// The three products against f64 sums of the (rounded, for bf16) operands, on a shape with
    /// edges (rows and widths not multiples of the kernels' tiles).
    #[test]
    fn the_three_products_match_f64_sums() {
        let (rows, k, n) = (37, 70, 45);
        let shape = LinearShape {
            rows,
            inputs: k,
            outputs: n,
        };
        let (x, w, dy) = (values(rows * k, 1), values(k * n, 2), values(rows * n, 3));
        for operands in [Operands::F32, Operands::Bf16] {
            let r = |v: f32| match operands {
                Operands::F32 => f64::from(v),
                Operands::Bf16 => f64::from(half::bf16::from_f32(v).to_f32()),
            };
            let mut y = vec![0f32; rows * n];
            let (mut dx, mut dw) = (vec![0f32; rows * k], vec![0f32; k * n]);
            forward(&mut y, &x, &w, shape, operands);
            backward(&mut dx, &mut dw, &x, &w, &dy, shape, operands);
            let close = |got: f32, want: f64| (f64::from(got) - want).abs() < 1e-4;
            for i in 0..rows {
                for j in 0..n {
                    let want: f64 = (0..k).map(|p| r(x[i * k + p]) * r(w[p * n + j])).sum();
                    assert!(close(y[i * n + j], want), "{operands:?} y ({i},{j})");
                }
                for p in 0..k {
                    let want: f64 = (0..n).map(|j| r(dy[i * n + j]) * r(w[p * n + j])).sum();
                    assert!(close(dx[i * k + p], want), "{operands:?} dx ({i},{p})");
                }
            }
            for p in 0..k {
                for j in 0..n {
                    let want: f64 = (0..rows).map(|i| r(x[i * k + p]) * r(dy[i * n + j])).sum();
                    assert!(close(dw[p * n + j], want), "{operands:?} dw ({p},{j})");
                }
            }
        }
    }
}
