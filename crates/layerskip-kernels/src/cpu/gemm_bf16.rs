//! Products with bf16 operands and f32 accumulation (AVX512-BF16's `vdpbf16ps`, twice the
//! multiply-adds of an f32 FMA per instruction): mixed-precision training's products, where
//! the activations and weights stay f32 and only a product's operands are rounded to bf16
//! (round to nearest even) as they are packed.
//!
//! `vdpbf16ps` adds, in each f32 lane, the products of a pair of bf16 values along the inner
//! dimension, so both operands are packed in pairs: the right operand ([`PackedRhs`]) once per
//! product in panels of [`NR`] columns, the left in panels of [`MR`] rows per block of rows. A
//! 6 x 64 microkernel keeps 24 accumulators in registers. Work splits over blocks of output rows
//! only and the inner dimension is summed in a fixed order, so the result does not depend on
//! the thread count.
//!
//! A CPU without AVX512-BF16 takes [`product_rounded`] instead: the operands rounded the same
//! way, multiplied by the f32 GEMM (also independent of the thread count).

use std::sync::Mutex;

use rayon::prelude::*;

use super::gemm::{self, Mat, Threads};

/// Rows of a microkernel tile.
const MR: usize = 6;
/// Columns of a microkernel tile (four 16-lane vectors).
const NR: usize = 64;
/// The inner dimension per pass over the output (a right panel of `KC / 2 x NR` pairs is 32 KiB).
const KC: usize = 256;
/// Output rows per task (eight tiles: the left block stays in L1/L2 while the right panels stream).
const MC: usize = 48;

/// Buffers kept for the next products: a training step packs (or rounds) hundreds of operands,
/// and a fresh allocation of each (zeroed, large ones mapped anew) cost a sixth of a step in
/// malloc and page faults.
struct Buffers<T>(Mutex<Vec<Vec<T>>>);

/// How many buffers each pool keeps (two threads' left blocks and a few right operands).
const KEPT: usize = 8;

impl<T: Copy + Default> Buffers<T> {
    const fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    /// A buffer of `len` default values (zeros), reused where one is kept.
    fn take(&self, len: usize) -> Vec<T> {
        let kept = self.0.lock().map(|mut b| b.pop()).unwrap_or(None);
        let mut buffer = kept.unwrap_or_default();
        buffer.clear();
        buffer.resize(len, T::default());
        buffer
    }

    /// Keeps `buffer` for a later [`Buffers::take`].
    fn give(&self, buffer: Vec<T>) {
        if let Ok(mut kept) = self.0.lock()
            && kept.len() < KEPT
        {
            kept.push(buffer);
        }
    }
}

/// The packed pairs of [`product`].
static PAIRS: Buffers<u32> = Buffers::new();
/// The rounded operands of [`product_rounded`].
static ROUNDED: Buffers<f32> = Buffers::new();

/// Whether this CPU has the bf16 products (AVX512-BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A pair of values along the inner dimension as the two bf16 halves of one 32-bit word (the
/// first value in the low half, as `vdpbf16ps` reads it).
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(half::bf16::from_f32(lo).to_bits())
        | (u32::from(half::bf16::from_f32(hi).to_bits()) << 16)
}

/// The right operand `[k, n]` of a product, packed: per block of [`KC`] inner indices, per panel
/// of [`NR`] columns, `ceil(kc / 2)` rows of `NR` pairs (zeros past `k` and `n`).
pub(crate) struct PackedRhs {
    pairs: Vec<u32>,
    k: usize,
    n: usize,
}

impl Drop for PackedRhs {
    fn drop(&mut self) {
        PAIRS.give(std::mem::take(&mut self.pairs));
    }
}

impl PackedRhs {
    /// Packs `rhs` `[k, n]`, rounding to bf16.
    ///
    /// # Panics
    /// If the CPU lacks AVX512-BF16 ([`available`]) or `rhs` does not reach `[k, n]`.
    pub(crate) fn new(rhs: Mat, k: usize, n: usize) -> Self {
        assert!(available(), "bf16 products need AVX512-BF16");
        assert!(k > 0 && n > 0 && rhs.reaches(k, n));
        let panels = n.div_ceil(NR);
        // KC is even, so every block but the last holds KC / 2 pairs: ceil(k / 2) in all.
        let mut pairs = PAIRS.take(k.div_ceil(2) * panels * NR);
        let mut panel_slices = Vec::new();
        let mut rest = pairs.as_mut_slice();
        for k0 in (0..k).step_by(KC) {
            let kp = (KC.min(k - k0)).div_ceil(2);
            for j in 0..panels {
                let (panel, tail) = rest.split_at_mut(kp * NR);
                panel_slices.push((k0, j * NR, panel));
                rest = tail;
            }
        }
        panel_slices.into_par_iter().for_each(|(k0, j0, panel)| {
            pack_rhs_panel(panel, rhs, k0, KC.min(k - k0), j0, n);
        });
        Self { pairs, k, n }
    }

    /// The panel of block `k0` and columns from `j0`.
    fn panel(&self, k0: usize, j0: usize) -> &[u32] {
        let panels = self.n.div_ceil(NR);
        let kp = (KC.min(self.k - k0)).div_ceil(2);
        let at = (k0 / 2) * panels * NR + (j0 / NR) * kp * NR;
        &self.pairs[at..at + kp * NR]
    }
}

/// `dst [m, n] (+)= lhs [m, k] · rhs [k, n]` with bf16 operands (`lhs` rounded as it is packed)
/// and f32 accumulation; `dst` row-major with row stride `ld`.
pub(crate) fn product(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: &PackedRhs,
    m: usize,
    threads: Threads,
) {
    let (n, k) = (rhs.n, rhs.k);
    assert!(m > 0 && n <= ld && (m - 1) * ld + n <= dst.len() && lhs.reaches(m, k));
    let task = |(t, rows): (usize, &mut [f32])| {
        let i0 = t * MC;
        if i0 < m {
            block(rows, ld, accumulate, lhs, rhs, i0, MC.min(m - i0));
        }
    };
    match threads {
        Threads::One => dst.chunks_mut(MC * ld).enumerate().for_each(task),
        Threads::All => dst.par_chunks_mut(MC * ld).enumerate().for_each(task),
    }
}

/// Rows `i0 .. i0 + rows` of the product into `dst` (those rows of the output).
fn block(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: &PackedRhs,
    i0: usize,
    rows: usize,
) {
    let (n, k) = (rhs.n, rhs.k);
    let tiles = rows.div_ceil(MR);
    let mut packed = PAIRS.take(tiles * MR * KC / 2);
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let kp = kc.div_ceil(2);
        pack_lhs(&mut packed[..tiles * MR * kp], lhs, i0, rows, k0, kc);
        let add = accumulate || k0 > 0;
        for j0 in (0..n).step_by(NR) {
            let b = rhs.panel(k0, j0);
            for t in 0..tiles {
                let a = &packed[t * MR * kp..(t + 1) * MR * kp];
                let (r, c) = (MR.min(rows - t * MR), NR.min(n - j0));
                let at = t * MR * ld + j0;
                if r == MR && c == NR {
                    // SAFETY: `available()` was checked when `rhs` was packed; the tile's
                    // rows `at + i * ld .. + NR` (i < MR) lie inside `dst` (asserted by `product`).
                    unsafe { x86::tile(kp, a, b, &mut dst[at..], ld, add) };
                } else {
                    let mut tile = [0f32; MR * NR];
                    // SAFETY: as above, into the local tile.
                    unsafe { x86::tile(kp, a, b, &mut tile, NR, false) };
                    for i in 0..r {
                        let out = &mut dst[at + i * ld..at + i * ld + c];
                        for (o, v) in out.iter_mut().zip(&tile[i * NR..i * NR + c]) {
                            *o = if add { *o + v } else { *v };
                        }
                    }
                }
            }
        }
    }
    PAIRS.give(packed);
}

/// Packs rows `i0 .. i0 + rows` of `lhs` over inner indices `k0 .. k0 + kc`: per tile of `MR`
/// rows, `ceil(kc / 2)` rows of `MR` pairs (zeros past the rows and `kc`).
fn pack_lhs(dst: &mut [u32], lhs: Mat, i0: usize, rows: usize, k0: usize, kc: usize) {
    let kp = kc.div_ceil(2);
    if !rows.is_multiple_of(MR) || !kc.is_multiple_of(2) {
        // Padding rows and the odd index's missing half stay zero.
        dst.fill(0);
    }
    if lhs.col == 1 {
        // Each row's inner values are contiguous: 32 of them make 16 pairs at once.
        for i in 0..rows {
            let (tile, r) = (i / MR, i % MR);
            let out = &mut dst[tile * MR * kp..];
            let src = &lhs.values[(i0 + i) * lhs.row + k0..];
            let mut p = 0;
            while 2 * p + 32 <= kc {
                let words = x86::pairs_along(&src[2 * p..2 * p + 32]);
                for (q, w) in words.into_iter().enumerate() {
                    out[(p + q) * MR + r] = w;
                }
                p += 16;
            }
            for p in p..kp {
                let hi = if 2 * p + 1 < kc { src[2 * p + 1] } else { 0.0 };
                out[p * MR + r] = pair(src[2 * p], hi);
            }
        }
    } else if lhs.row == 1 {
        // Each inner index's rows are contiguous (a transposed operand): two inner rows give
        // the pairs of 16 output rows at once.
        let slots: Vec<usize> = (0..rows).map(|i| (i / MR) * MR * kp + i % MR).collect();
        for p in 0..kp {
            let lo = &lhs.values[(k0 + 2 * p) * lhs.col + i0..];
            let hi = (2 * p + 1 < kc).then(|| &lhs.values[(k0 + 2 * p + 1) * lhs.col + i0..]);
            let out = &mut dst[p * MR..];
            let mut i = 0;
            if let Some(hi) = hi {
                while i + 16 <= rows {
                    let words = x86::pairs_across(&lo[i..i + 16], &hi[i..i + 16]);
                    for (&slot, w) in slots[i..i + 16].iter().zip(words) {
                        out[slot] = w;
                    }
                    i += 16;
                }
            }
            for i in i..rows {
                out[slots[i]] = pair(lo[i], hi.map_or(0.0, |h| h[i]));
            }
        }
    } else {
        for i in 0..rows {
            let (tile, r) = (i / MR, i % MR);
            for p in 0..kp {
                let lo = lhs.at(i0 + i, k0 + 2 * p);
                let hi = if 2 * p + 1 < kc {
                    lhs.at(i0 + i, k0 + 2 * p + 1)
                } else {
                    0.0
                };
                dst[tile * MR * kp + p * MR + r] = pair(lo, hi);
            }
        }
    }
}

/// Packs columns `j0 .. j0 + NR` (zeros past `n`) of `rhs` over inner indices `k0 .. k0 + kc`.
fn pack_rhs_panel(dst: &mut [u32], rhs: Mat, k0: usize, kc: usize, j0: usize, n: usize) {
    let kp = kc.div_ceil(2);
    let cols = NR.min(n - j0);
    if rhs.col == 1 {
        // Rows are contiguous: two inner rows give 16 columns' pairs at once.
        for p in 0..kp {
            let lo = &rhs.values[(k0 + 2 * p) * rhs.row + j0..];
            let hi = (2 * p + 1 < kc).then(|| &rhs.values[(k0 + 2 * p + 1) * rhs.row + j0..]);
            let out = &mut dst[p * NR..(p + 1) * NR];
            let mut c = 0;
            if let Some(hi) = hi {
                while c + 16 <= cols {
                    out[c..c + 16]
                        .copy_from_slice(&x86::pairs_across(&lo[c..c + 16], &hi[c..c + 16]));
                    c += 16;
                }
            }
            for c in c..cols {
                out[c] = pair(lo[c], hi.map_or(0.0, |h| h[c]));
            }
        }
    } else if rhs.row == 1 {
        // Columns are contiguous (a transposed operand): 32 inner values make 16 pairs.
        for c in 0..cols {
            let src = &rhs.values[(j0 + c) * rhs.col + k0..];
            let mut p = 0;
            while 2 * p + 32 <= kc {
                let words = x86::pairs_along(&src[2 * p..2 * p + 32]);
                for (q, w) in words.into_iter().enumerate() {
                    dst[(p + q) * NR + c] = w;
                }
                p += 16;
            }
            for p in p..kp {
                let hi = if 2 * p + 1 < kc { src[2 * p + 1] } else { 0.0 };
                dst[p * NR + c] = pair(src[2 * p], hi);
            }
        }
    } else {
        for p in 0..kp {
            for c in 0..cols {
                let lo = rhs.at(k0 + 2 * p, j0 + c);
                let hi = if 2 * p + 1 < kc {
                    rhs.at(k0 + 2 * p + 1, j0 + c)
                } else {
                    0.0
                };
                dst[p * NR + c] = pair(lo, hi);
            }
        }
    }
    for row in dst.chunks_mut(NR).take(kp) {
        row[cols..].fill(0);
    }
}

/// The right operand `[k, n]` of a product with bf16 operands on a CPU without AVX512-BF16:
/// rounded to bf16 (round to nearest even) once, kept as f32 values in the operand's own layout,
/// for [`product_rounded`].
pub(crate) struct RoundedRhs {
    values: Vec<f32>,
    /// The operand's strides (row, column).
    strides: (usize, usize),
    k: usize,
    n: usize,
}

impl Drop for RoundedRhs {
    fn drop(&mut self) {
        ROUNDED.give(std::mem::take(&mut self.values));
    }
}

impl RoundedRhs {
    /// Rounds `rhs` `[k, n]`.
    ///
    /// # Panics
    /// If `rhs` does not reach `[k, n]`.
    pub(crate) fn new(rhs: Mat, k: usize, n: usize) -> Self {
        assert!(k > 0 && n > 0 && rhs.reaches(k, n));
        Self {
            values: rounded(rhs, k, n, Threads::All),
            strides: (rhs.row, rhs.col),
            k,
            n,
        }
    }
}

/// `v` rounded to the nearest bf16 value, ties to even (NaN stays NaN): as
/// `half::bf16::from_f32(v).to_f32()`, in integer operations the compiler vectorises.
fn round_bf16(v: f32) -> f32 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    if v.is_nan() {
        v
    } else {
        f32::from_bits(rounded)
    }
}

/// The values `mat` `[rows, cols]` spans (from its first element to its last, in its own
/// layout) rounded to bf16, in a buffer of [`ROUNDED`]; the same strides address them. Reading
/// the span in order keeps the pass contiguous for transposed operands too.
fn rounded(mat: Mat, rows: usize, cols: usize, threads: Threads) -> Vec<f32> {
    let span = (rows - 1) * mat.row + (cols - 1) * mat.col + 1;
    let mut out = ROUNDED.take(span);
    let fill = |(o, v): (&mut [f32], &[f32])| {
        for (o, &v) in o.iter_mut().zip(v) {
            *o = round_bf16(v);
        }
    };
    const CHUNK: usize = 1 << 14;
    let values = &mat.values[..span];
    match threads {
        Threads::One => out
            .chunks_mut(CHUNK)
            .zip(values.chunks(CHUNK))
            .for_each(fill),
        Threads::All => out
            .par_chunks_mut(CHUNK)
            .zip(values.par_chunks(CHUNK))
            .for_each(fill),
    }
    out
}

/// [`product`] on a CPU without AVX512-BF16: the same bf16 operands (`lhs` rounded here, `rhs`
/// when it was made) through the f32 GEMM. A product of two bf16 values is exact in f32, so
/// the result is the sum of the same products as `vdpbf16ps` forms, accumulated in f32 in
/// another order; as fast as an f32 product, where casting the model to bf16 instead would run
/// Burn's generic bf16 operations.
pub(crate) fn product_rounded(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: &RoundedRhs,
    m: usize,
    threads: Threads,
) {
    let (n, k) = (rhs.n, rhs.k);
    assert!(m > 0 && lhs.reaches(m, k));
    let left = rounded(lhs, m, k, threads);
    let (row, col) = rhs.strides;
    gemm::product(
        dst,
        ld,
        accumulate,
        Mat::new(&left, lhs.row, lhs.col),
        Mat::new(&rhs.values, row, col),
        [m, n, k],
        threads,
    );
    ROUNDED.give(left);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// 32 consecutive values as 16 pairs (RNE to bf16).
    pub(super) fn pairs_along(src: &[f32]) -> [u32; 16] {
        assert_eq!(src.len(), 32);
        // SAFETY: the packers run only where `available()` holds; 32 values are read.
        unsafe { pairs_along_avx512(src.as_ptr()) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pairs_along_avx512(src: *const f32) -> [u32; 16] {
        // SAFETY: the caller passes 32 readable values.
        unsafe {
            let lo = _mm512_loadu_ps(src);
            let hi = _mm512_loadu_ps(src.add(16));
            // The first argument fills the upper 16 halves: pairs stay in order.
            let bf = _mm512_cvtne2ps_pbh(hi, lo);
            std::mem::transmute::<__m512bh, [u32; 16]>(bf)
        }
    }

    /// 16 pairs `(lo[i], hi[i])` (RNE to bf16).
    pub(super) fn pairs_across(lo: &[f32], hi: &[f32]) -> [u32; 16] {
        assert!(lo.len() == 16 && hi.len() == 16);
        // SAFETY: as for `pairs_along`; 16 values of each are read.
        unsafe { pairs_across_avx512(lo.as_ptr(), hi.as_ptr()) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pairs_across_avx512(lo: *const f32, hi: *const f32) -> [u32; 16] {
        // SAFETY: the caller passes 16 readable values each.
        unsafe {
            let lo = _mm512_cvtneps_pbh(_mm512_loadu_ps(lo));
            let hi = _mm512_cvtneps_pbh(_mm512_loadu_ps(hi));
            let lo = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(lo));
            let hi = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(hi));
            std::mem::transmute(_mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)))
        }
    }

    /// One `MR x NR` tile: `c (+)= a · b` over `kp` pairs, `c` row-major with row stride `ldc`.
    ///
    /// # Safety
    /// AVX512-BF16 must be available; `a` holds `kp * MR` and `b` `kp * NR` words, and `c` the
    /// tile's rows `i * ldc .. i * ldc + NR`.
    pub(super) unsafe fn tile(
        kp: usize,
        a: &[u32],
        b: &[u32],
        c: &mut [f32],
        ldc: usize,
        add: bool,
    ) {
        debug_assert!(a.len() >= kp * MR && b.len() >= kp * NR);
        debug_assert!(c.len() >= (MR - 1) * ldc + NR);
        // SAFETY: forwarded from the caller.
        unsafe { tile_avx512(kp, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), ldc, add) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile_avx512(
        kp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        // SAFETY: the bounds are the caller's (see `tile`).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NR / 16]; MR];
            for p in 0..kp {
                let bp = b.add(p * NR) as *const f32;
                let bv: [__m512bh; NR / 16] = std::array::from_fn(|j| {
                    std::mem::transmute::<__m512, __m512bh>(_mm512_loadu_ps(bp.add(16 * j)))
                });
                let ap = a.add(p * MR);
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *ap.add(r) as i32,
                    ));
                    for (s, bj) in row.iter_mut().zip(bv) {
                        *s = _mm512_dpbf16_ps(*s, av, bj);
                    }
                }
            }
            for (r, row) in acc.into_iter().enumerate() {
                for (j, s) in row.into_iter().enumerate() {
                    let p = c.add(r * ldc + 16 * j);
                    let v = if add {
                        _mm512_add_ps(_mm512_loadu_ps(p), s)
                    } else {
                        s
                    };
                    _mm512_storeu_ps(p, v);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    //! Never called: [`super::available`] is false off x86-64.
    pub(super) fn pairs_along(_: &[f32]) -> [u32; 16] {
        unreachable!("bf16 products need AVX512-BF16")
    }
    pub(super) fn pairs_across(_: &[f32], _: &[f32]) -> [u32; 16] {
        unreachable!("bf16 products need AVX512-BF16")
    }
    pub(super) unsafe fn tile(_: usize, _: &[u32], _: &[u32], _: &mut [f32], _: usize, _: bool) {
        unreachable!("bf16 products need AVX512-BF16")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf(v: f32) -> f64 {
        f64::from(half::bf16::from_f32(v).to_f32())
    }

    use crate::cpu::test_values as values;

    /// The product of the bf16-rounded operands in f64, against the kernel (where the CPU has
    /// AVX512-BF16) and the f32 GEMM on rounded operands (every CPU), for every packing route
    /// (contiguous, transposed and general strides) and shapes with edges in every dimension
    /// (m, n, k not multiples of the tile, k odd, more than one inner block).
    #[test]
    fn matches_the_product_of_rounded_operands() {
        if !available() {
            eprintln!("AVX512-BF16 kernel skipped: this CPU lacks it");
        }
        for &[m, n, k] in &[
            [1, 1, 1],
            [7, 65, 33],
            [50, 130, 257],
            [13, 64, 600],
            [96, 200, 31],
        ] {
            let a = values(m * k * 2, 1);
            let b = values(k * n * 2, 2);
            // lhs: row-major, transposed, strided (every other value); likewise rhs.
            let lhs = [
                Mat::new(&a, k, 1),
                Mat::new(&a, 1, m),
                Mat::new(&a, 2 * k, 2),
            ];
            let rhs = [
                Mat::new(&b, n, 1),
                Mat::new(&b, 1, k),
                Mat::new(&b, 1, 2 * k),
            ];
            let routes = [true, false]
                .into_iter()
                .filter(|&native| !native || available());
            for (native, (li, l)) in
                routes.flat_map(|r| std::iter::repeat(r).zip(lhs.iter().enumerate()))
            {
                for (ri, r) in rhs.iter().enumerate() {
                    let ld = n + 3;
                    let start = values(m * ld, 3);
                    for (accumulate, threads) in [(false, Threads::All), (true, Threads::One)] {
                        let mut dst = start.clone();
                        if native {
                            let packed = PackedRhs::new(*r, k, n);
                            product(&mut dst, ld, accumulate, *l, &packed, m, threads);
                        } else {
                            let rounded = RoundedRhs::new(*r, k, n);
                            product_rounded(&mut dst, ld, accumulate, *l, &rounded, m, threads);
                        }
                        for i in 0..m {
                            for j in 0..n {
                                let mut want: f64 =
                                    (0..k).map(|p| bf(l.at(i, p)) * bf(r.at(p, j))).sum();
                                if accumulate {
                                    want += f64::from(start[i * ld + j]);
                                }
                                let got = f64::from(dst[i * ld + j]);
                                assert!(
                                    (got - want).abs()
                                        <= 1e-5 * (k as f64).sqrt() + 1e-6 * want.abs(),
                                    "[{m},{n},{k}] native {native} lhs {li} rhs {ri} acc {accumulate} ({i},{j}): {got} vs {want}"
                                );
                            }
                            // Columns past n are not written.
                            for j in n..ld {
                                assert_eq!(dst[i * ld + j], start[i * ld + j]);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The rounding of the f32-GEMM route is `half`'s (round to nearest, ties to even) on every
    /// kind of value: ties both ways, a carry into the exponent, the largest finite values
    /// (rounding up to infinity), subnormals, infinities, zeros of both signs and NaNs.
    #[test]
    fn rounding_is_halfs() {
        let mut cases = vec![
            0.0,
            -0.0,
            1.0,
            f32::from_bits(0x3f80_8000), // a tie, rounded down to even
            f32::from_bits(0x3f81_8000), // a tie, rounded up to even
            f32::from_bits(0x3fff_ffff), // carries into the exponent
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(0x0000_8001), // subnormal
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001), // a NaN with only low payload bits
        ];
        cases.extend(values(4096, 9).iter().map(|v| v * 1e3));
        for v in cases {
            let want = half::bf16::from_f32(v).to_f32();
            let got = round_bf16(v);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{v:e} ({:#x}): {got:e} vs {want:e}",
                v.to_bits()
            );
        }
    }

    /// One thread or all give the same bits, on both routes.
    #[test]
    fn the_thread_count_does_not_change_the_result() {
        let (m, n, k) = (301, 100, 700);
        let (a, b) = (values(m * k, 4), values(k * n, 5));
        let (lhs, rhs) = (Mat::new(&a, k, 1), Mat::new(&b, n, 1));
        let both = |run: &dyn Fn(&mut [f32], Threads)| {
            let mut one = vec![0f32; m * n];
            let mut all = vec![0f32; m * n];
            run(&mut one, Threads::One);
            run(&mut all, Threads::All);
            assert_eq!(one, all);
        };
        if available() {
            let packed = PackedRhs::new(rhs, k, n);
            both(&|dst, threads| product(dst, n, false, lhs, &packed, m, threads));
        }
        let rounded = RoundedRhs::new(rhs, k, n);
        both(&|dst, threads| product_rounded(dst, n, false, lhs, &rounded, m, threads));
    }
}
