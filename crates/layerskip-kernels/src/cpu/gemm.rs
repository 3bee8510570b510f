//! The products of the training kernels: gemm's f32 GEMM (AVX-512 or AVX2/FMA microkernels,
//! chosen at run time) over strided operands, so transposed and per-head views need no copies.

use gemm::{Parallelism, gemm};

/// A strided matrix operand.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub(crate) values: &'a [f32],
    /// The distance between rows.
    pub(crate) row: usize,
    /// The distance between columns.
    pub(crate) col: usize,
}

impl<'a> Mat<'a> {
    pub(crate) fn new(values: &'a [f32], row: usize, col: usize) -> Self {
        Self { values, row, col }
    }

    /// The transpose (a view).
    pub(crate) fn t(self) -> Self {
        Self {
            row: self.col,
            col: self.row,
            ..self
        }
    }

    /// The rows from `i` on (a view).
    pub(crate) fn rows_from(self, i: usize) -> Self {
        Self {
            values: &self.values[i * self.row..],
            ..self
        }
    }

    /// Whether the values hold a `[rows, cols]` matrix at these strides.
    pub(crate) fn reaches(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.row + (cols - 1) * self.col < self.values.len()
    }

    pub(crate) fn at(&self, i: usize, j: usize) -> f32 {
        self.values[i * self.row + j * self.col]
    }
}

/// Where a product runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// On the calling thread (callers that split their work over threads themselves).
    One,
    /// On every thread of rayon's pool.
    All,
}

/// `dst [m, n] (+)= lhs [m, k] · rhs [k, n]` (`accumulate`: added to `dst`), `dst` row-major
/// with row stride `ld`. gemm splits the work over output blocks only, so the result does not
/// depend on the thread count.
pub(crate) fn product(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    [m, n, k]: [usize; 3],
    threads: Threads,
) {
    assert!(m > 0 && n > 0 && k > 0 && n <= ld && (m - 1) * ld + n <= dst.len());
    assert!(lhs.reaches(m, k) && rhs.reaches(k, n));
    // SAFETY: the asserts keep every read and write inside the slices.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            lhs.values.as_ptr(),
            lhs.col as isize,
            lhs.row as isize,
            rhs.values.as_ptr(),
            rhs.col as isize,
            rhs.row as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            match threads {
                Threads::One => Parallelism::None,
                Threads::All => Parallelism::Rayon(0),
            },
        );
    }
}
