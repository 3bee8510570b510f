//! Products of a few rows with a weight matrix read from a packed copy ([`Panels`]: panels of
//! [`NR`] output columns, each panel's input features in order; weights that are all bfloat16
//! values in half the bytes, and quantized blocks, with [`TILE`] panels interleaved feature by
//! feature so that a one-row pass reads one contiguous stream), with up to six rows'
//! accumulators in registers while a panel streams once.
//!
//! Each output is `fma(x[k-1], w[k-1], ... fma(x[0], w[0], 0))`, the same operations in the same
//! order for any number of rows, so a row's result does not depend on which other rows share
//! the call. [`portable`] is that order in scalar code; the SIMD kernels (AVX2, AVX-512) reproduce
//! it bit for bit, for every panel format (f32, bf16, and the quantized blocks, whose values are
//! rebuilt exactly before the multiply-add).

use super::pool::{Out, Pool};

/// Output columns per panel: two AVX2 vectors, one 64-byte cache line per feature.
pub const NR: usize = 16;

/// Panels interleaved in memory in the bfloat16 and quantized formats: feature `i`'s lines
/// (or block `b`'s blocks) of the `TILE` panels of a tile lie side by side, so the four panels
/// a one-row pass reads at once are one stream, which the hardware prefetcher follows further
/// than four streams that restart every few kilobytes (what bounds one core's decoding of a
/// bf16 model). f32 lines (a whole cache line per feature and panel) are tiled only when the
/// kernels run on one thread: four streams drew more than one on two cores, one more than four
/// on one core. Figures: docs/results/cpu-tiles-2026-11-28.md, docs/results/cpu-int8-2026-12-07.md.
pub const TILE: usize = 4;

/// What a kernel needs of a [`Panels`] besides its units: `k` features, `count` panels in
/// tiles of `tile`.
#[derive(Clone, Copy)]
struct Shape {
    k: usize,
    count: usize,
    tile: usize,
}

/// Where a kernel's panels lie: `k` features (a row of `x`), `next` bytes from one panel's
/// first unit to the next panel's, `stride` bytes from a unit of a panel to its next unit.
#[derive(Clone, Copy)]
struct Span {
    k: usize,
    next: usize,
    stride: usize,
}

/// The panels from `p` (before `p1`) that a kernel reads together, at most four and never
/// past `p`'s tile: the index of the first's first unit, how many, and their [`Span`].
fn span(
    p: usize,
    p1: usize,
    shape: Shape,
    (features, unit): (usize, usize),
) -> (usize, usize, Span) {
    let Shape { k, count, tile } = shape;
    let per = k / features;
    let (start, g) = tile_start(p, count, per, tile);
    let (step, next) = if tile == 1 {
        ((p1 - p).min(4), per * unit)
    } else {
        (p1.min(p - p % tile + g) - p, unit)
    };
    (
        start,
        step,
        Span {
            k,
            next,
            stride: g * unit,
        },
    )
}

/// One pass of a kernel: rows `r..r + size` against the `take` panels from `p`, the first of
/// which starts `offset` bytes into the units, laid out as `span` says.
#[derive(Clone, Copy)]
struct Pass {
    r: usize,
    size: usize,
    p: usize,
    take: usize,
    offset: usize,
    span: Span,
}

/// The passes over the panels `p0..p1` of units `layout` (features, bytes): tile by tile (or
/// run of untiled panels, [`span`]), the `rows` in groups of at most `mr` (as even as
/// possible), each group over the tile's panels four, two or one at a time, at most
/// `wide(size)`, every group using a tile before the next tile (from the cache after the first).
fn passes(
    shape: Shape,
    layout: (usize, usize),
    (rows, mr): (usize, usize),
    (p0, p1): (usize, usize),
    wide: impl Fn(usize) -> usize,
    mut pass: impl FnMut(Pass),
) {
    let groups = rows.div_ceil(mr);
    let mut p = p0;
    while p < p1 {
        let (start, step, span) = span(p, p1, shape, layout);
        let mut r = 0;
        for g in 0..groups {
            let size = rows / groups + usize::from(g < rows % groups);
            let mut q = 0;
            while q < step {
                let take = match (step - q).min(wide(size)) {
                    4 => 4,
                    2 | 3 => 2,
                    _ => 1,
                };
                let offset = start * layout.1 + q * span.next;
                pass(Pass {
                    r,
                    size,
                    p: p + q,
                    take,
                    offset,
                    span,
                });
                q += take;
            }
            r += size;
        }
        p += step;
    }
}

/// Most rows whose accumulators stay in registers together (6 rows x 2 vectors + 2 weight
/// vectors + 1 broadcast = 15 of the 16 AVX2 registers).
const MR: usize = 6;

/// Products of at least this many multiply-adds split their panels over the threads of the
/// [`Pool`] (each output is still one thread's chain, so results do not change). A second core
/// pays even for one row: a decode step's weights stream from memory at what one core draws,
/// and the pool's hand-over costs about a microsecond. Overridden by
/// [`CpuOptions::parallel_work`](super::CpuOptions::parallel_work) (to measure).
pub const PARALLEL_WORK: usize = 1 << 16;

fn parallel_work() -> usize {
    super::options().parallel_work.unwrap_or(PARALLEL_WORK)
}

mod formats;
pub use formats::*;

pub mod int8;

/// A kernel over the panels `p0..p1`: `(x, w, out, rows, cols, p0, p1)`.
type PanelRange = unsafe fn(&[f32], &Panels, *mut f32, usize, usize, usize, usize);

/// `out[r, c] = x[r, :] · w[:, c]` for the first `cols` outputs, `x` `[rows, k]`, `out`
/// `[rows, cols]`; the widest kernel this CPU runs ([`Kernel::chosen`]), large products split
/// over the threads of the [`Pool`]. Quantized panels take `x` quantized to 8 bits per block
/// ([`int8`]).
pub fn x_panels(x: &[f32], w: &Panels, out: &mut [f32], rows: usize, cols: usize) {
    assert!(cols <= w.n && x.len() >= rows * w.k && out.len() >= rows * cols);
    let chosen = Kernel::chosen();
    let o = Out(out.as_mut_ptr());
    if w.quantization().is_some() {
        let a = int8::Activations::quantize(x, rows, w.k);
        let kernel = chosen.int8_function();
        // SAFETY: as below.
        split(w, rows, cols, &|p0, p1| unsafe {
            kernel(&a, w, o.ptr(), rows, cols, p0, p1)
        });
    } else {
        let kernel = chosen.function();
        // SAFETY: the shapes are asserted above, `kernel` runs on this CPU (checked above for
        // the SIMD one), and the parts write disjoint panels.
        split(w, rows, cols, &|p0, p1| unsafe {
            kernel(x, w, o.ptr(), rows, cols, p0, p1)
        });
    }
}

/// `run(p0, p1)` over the panels of the first `cols` outputs, split over the threads of the
/// [`Pool`] when the product is large.
fn split(w: &Panels, rows: usize, cols: usize, run: &(dyn Fn(usize, usize) + Sync)) {
    let count = cols.div_ceil(NR);
    let pool = Pool::global();
    let parts = pool.threads().min(count);
    if parts > 1 && rows * w.k * cols >= parallel_work() {
        // Panels in `parts` contiguous ranges, as even as possible.
        let bound = |t: usize| share_start(t, parts, count, w.tile);
        pool.run(parts, &|t| run(bound(t), bound(t + 1)));
    } else {
        run(0, count);
    }
    debug_assert!(w.count() >= count);
}

/// Where thread `t`'s share of `count` panels starts when `parts` threads split them as
/// evenly as whole tiles of `tile` allow (two threads reading alternate units of one tile
/// would pull each other's cache lines); `share_start(parts, ..)` is `count`.
fn share_start(t: usize, parts: usize, count: usize, tile: usize) -> usize {
    if t >= parts {
        count
    } else {
        ((t * count / parts + tile / 2) / tile * tile).min(count)
    }
}

/// Bytes ahead of the line in use that a kernel asks the cache to fetch in a panel of
/// untiled lines (32 f32 lines: the hardware prefetcher alone falls behind when several rows
/// share each line).
const PREFETCH_LINES: usize = 2048;

/// The hints a SIMD kernel gives before it reads feature `i` of `panels` panels from `a`
/// (`next` bytes apart, lines `stride` bytes apart, `unit` bytes each). Untiled panels stream
/// side by side, a hint ahead in each; a tile of bfloat16 lines gets none (the hardware
/// prefetcher keeps up, and hints slowed it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(a: *const u8, i: usize, panels: usize, (next, stride): (usize, usize), unit: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: hints only: past the end of the lines they read nothing.
    unsafe {
        if stride == unit {
            for j in 0..panels {
                let ahead = a.wrapping_add(j * next + i * stride + PREFETCH_LINES);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
        }
    }
}

/// The instruction sets the product kernels come in, all computing the same chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Scalar code ([`portable`]).
    Portable,
    /// AVX2, FMA (and F16C, for 4-bit blocks' scales): a panel's line is two 8-lane vectors.
    Avx2,
    /// AVX-512F: a panel's line is one 16-lane vector, twice the registers for accumulators.
    Avx512,
}

impl Kernel {
    /// The widest kernel this CPU runs, or [`CpuOptions::kernel`](super::CpuOptions::kernel)
    /// if this CPU runs it: for measuring one against another.
    pub fn chosen() -> Kernel {
        static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let available = Kernel::available();
            let named = super::options().kernel.filter(|k| available.contains(k));
            named.unwrap_or(*available.last().expect("portable always runs"))
        })
    }

    /// The kernel of that name (`portable`, `avx2`, `avx512`, any case), whether or not this
    /// CPU runs it.
    pub fn named(name: &str) -> Option<Kernel> {
        [Kernel::Portable, Kernel::Avx2, Kernel::Avx512]
            .into_iter()
            .find(|k| format!("{k:?}").eq_ignore_ascii_case(name.trim()))
    }

    /// The kernels this CPU runs, narrowest first.
    pub fn available() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                kernels.push(Kernel::Avx2);
                if has!("avx512f") {
                    kernels.push(Kernel::Avx512);
                }
            }
        }
        kernels
    }

    /// The integer kernel for quantized panels: AVX-512 needs BW and VNNI besides, and falls
    /// back to the AVX2 one without them (the same bits either way).
    fn int8_function(self) -> int8::BlockRange {
        match self {
            Kernel::Portable => int8::portable,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => int8::avx2::panels,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512bw") && has!("avx512vnni") {
                    int8::avx512::panels
                } else {
                    int8::avx2::panels
                }
            }
            #[allow(unreachable_patterns)]
            _ => int8::portable,
        }
    }

    fn function(self) -> PanelRange {
        match self {
            Kernel::Portable => portable::panels,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::panels,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => avx512::panels,
            #[allow(unreachable_patterns)]
            _ => portable::panels,
        }
    }
}

/// [`x_panels`] with a given kernel on one thread, for tests and benchmarks.
///
/// # Panics
/// If this CPU does not run `kernel`, or the shapes do not fit.
pub fn x_panels_with(
    kernel: Kernel,
    x: &[f32],
    w: &Panels,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    assert!(
        Kernel::available().contains(&kernel),
        "{kernel:?} does not run here"
    );
    assert!(cols <= w.n && x.len() >= rows * w.k && out.len() >= rows * cols);
    let count = cols.div_ceil(NR);
    // SAFETY: the shapes are asserted above and the CPU runs `kernel`.
    unsafe {
        if w.quantization().is_some() {
            let a = int8::Activations::quantize(x, rows, w.k);
            (kernel.int8_function())(&a, w, out.as_mut_ptr(), rows, cols, 0, count);
        } else {
            (kernel.function())(x, w, out.as_mut_ptr(), rows, cols, 0, count);
        }
    }
}

/// The body of each SIMD module's `panels`: that module's `run` with its loader for the
/// panels' format (`F32`, `Bf16`; quantized panels take the [`int8`] kernels), the lines
/// passed as bytes.
#[cfg(target_arch = "x86_64")]
macro_rules! run_by_format {
    ($x:expr, $w:expr, $out:expr, $rows:expr, $cols:expr, $p0:expr, $p1:expr) => {{
        let shape = $w.shape();
        match &$w.lines {
            super::Lines::F32(l) => {
                run::<F32>($x, l.as_ptr().cast(), shape, $out, $rows, $cols, $p0, $p1)
            }
            super::Lines::Bf16(l) if $w.tile > 1 => {
                run::<Bf16Pairs>($x, l.as_ptr().cast(), shape, $out, $rows, $cols, $p0, $p1)
            }
            super::Lines::Bf16(l) => {
                run::<Bf16>($x, l.as_ptr().cast(), shape, $out, $rows, $cols, $p0, $p1)
            }
            super::Lines::Q8(_) | super::Lines::Q4(..) => {
                unreachable!("quantized panels go through the int8 kernels")
            }
        }
    }};
}

/// The reference order, in scalar code: what the SIMD kernels must reproduce bit for bit.
pub mod portable;

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests;
