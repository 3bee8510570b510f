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
/// bf16 model). f32 lines (a whole cache line per feature and panel) stay one panel to a tile,
/// where four streams drew more than one on two cores. Figures: docs/results/cpu-tiles-2026-11-28.md.
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

/// Most rows whose accumulators stay in registers together (6 rows x 2 vectors + 2 weight
/// vectors + 1 broadcast = 15 of the 16 AVX2 registers).
const MR: usize = 6;

/// Products of at least this many multiply-adds split their panels over the threads of the
/// [`Pool`] (each output is still one thread's chain, so results do not change). A second core
/// pays even for one row: a decode step's weights stream from memory at what one core draws,
/// and the pool's hand-over costs about a microsecond. Overridden by `LAYERSKIP_PARALLEL_WORK`
/// (to measure).
const PARALLEL_WORK: usize = 1 << 16;

fn parallel_work() -> usize {
    static WORK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *WORK.get_or_init(|| {
        std::env::var("LAYERSKIP_PARALLEL_WORK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(PARALLEL_WORK)
    })
}

/// One feature's weights for one panel's 16 output columns, on its own cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Line(pub [f32; NR]);

/// [`Line`] for weights that are exact in bfloat16: the upper 16 bits of each f32, half a
/// cache line.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct HalfLine(pub [u16; NR]);

/// Features per block of the 8-bit format ([`Q8Block`]), as in ggml's Q8_0.
pub const QK: usize = 32;

/// One panel's weights for [`QK`] consecutive features in ggml's Q8_0 format, kept quantized:
/// per output column a scale `d` (an f16 value, held as f32) and 32 signed bytes `q`, the
/// weight being `d * q`, which f32 holds exactly (an 11-bit by 8-bit product). 576 bytes for
/// 512 weights, against 1024 in bfloat16.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Q8Block {
    scale: [f32; NR],
    q: [[i8; NR]; QK],
}

/// One panel's weights for [`QK`] consecutive features in a 4-bit format (ggml's Q4_0 or
/// Q4_1), kept quantized: per output column a scale `d` and an offset `m` (f16 values, held as
/// f32) and 32 nibbles `q`, the weight being `fma(q, d, m)` (`q * d` is exact, so this is the
/// value ggml's dequantisation computes; Q4_0 is the case `m = -8 d`). Byte `q[t][j]` holds
/// feature `2t`'s nibble for column `j` in its low half and feature `2t + 1`'s in its high half.
/// 384 bytes for 512 weights.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Q4Block {
    scale: [f32; NR],
    min: [f32; NR],
    q: [[u8; NR]; QK / 2],
}

/// The lines of a [`Panels`].
enum Lines {
    F32(Vec<Line>),
    /// Every weight is a bfloat16 value (a checkpoint stored in bf16, computed in f32): the
    /// same numbers in half the bytes, so the kernels' products do not change.
    Bf16(Vec<HalfLine>),
    /// Quantized to 8 bits: block `p * k / QK + b` holds panel `p`'s features `b * QK..`.
    Q8(Vec<Q8Block>),
    /// Quantized to 4 bits, blocks as [`Lines::Q8`].
    Q4(Vec<Q4Block>, Quantization),
}

/// A quantized format the panels can hold weights in (`--quantize`): ggml's block formats,
/// quantized by ggml's reference quantizers, dequantised in registers and summed in f32. Weights
/// dequantised from a Q8_0 or Q4_0 file (formats llama.cpp writes with those reference
/// quantizers) quantize back to the file's blocks; Q4_1 files are written by an
/// error-minimising search, so re-quantizing one does not reproduce its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// ggml's Q8_0: per 32 input features and output, an f16 scale (`amax / 127`) and rounded
    /// signed bytes (1.125 bytes per weight).
    Q8_0,
    /// ggml's Q4_0: per 32 input features and output, an f16 scale `d` (the value of largest
    /// magnitude over -8) and nibbles `q`, each weight `d * (q - 8)` (0.625 bytes per weight).
    Q4_0,
    /// ggml's Q4_1: per 32 input features and output, an f16 scale `d = (max - min) / 15`, an
    /// f16 offset `m = min` and nibbles `q`, each weight `q * d + m` (0.75 bytes per weight in
    /// the panels, which hold the scales as f32).
    Q4_1,
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4_0 => "q4_0",
            Quantization::Q4_1 => "q4_1",
        })
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(Quantization::Q8_0),
            "q4_0" => Ok(Quantization::Q4_0),
            "q4_1" => Ok(Quantization::Q4_1),
            _ => Err(format!(
                "unknown quantization {s:?}: expected q8_0, q4_0 or q4_1"
            )),
        }
    }
}

/// A weight matrix with `k` input features and `n` outputs, in panels of [`NR`] output
/// columns, zero past `n` in the last panel, tiles of panels ([`TILE`]; one for f32 lines):
/// feature `i`'s line of panel `p` is line `start(p) + i * g` (`g` panels in
/// `p`'s tile; blocks of [`QK`] features likewise, block `b` at `start(p) + b * g`).
pub struct Panels {
    lines: Lines,
    /// Panels per tile: [`TILE`] for quantized blocks, and for bfloat16 lines read by the
    /// AVX-512 kernel (which reads a tile's four panels at once); 1 otherwise (f32 lines, and
    /// bfloat16 for the AVX2 kernel, which reads one or two panels at a time).
    tile: usize,
    k: usize,
    n: usize,
}

impl Panels {
    /// Panels of `weight(feature, output)`, in bfloat16 lines when `bf16`, `tile` panels to a
    /// tile (`None`: the chosen kernel's layout, as the `tile` field says).
    fn build(
        k: usize,
        n: usize,
        bf16: bool,
        tile: Option<usize>,
        weight: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Self {
        let count = n.div_ceil(NR);
        // Feature `i`'s weights for panel `p`'s columns, zero past `n`.
        let line = |p: usize, i: usize| -> [f32; NR] {
            std::array::from_fn(|j| {
                let c = p * NR + j;
                if c < n { weight(i, c) } else { 0.0 }
            })
        };
        let (lines, tile) = if bf16 {
            let tiled_here = Kernel::chosen() == Kernel::Avx512;
            let tile = tile.unwrap_or(if tiled_here { TILE } else { 1 });
            let lines = tiled(count, k, tile, HalfLine([0; NR]), |p, i| {
                HalfLine(line(p, i).map(|v| (v.to_bits() >> 16) as u16))
            });
            (Lines::Bf16(lines), tile)
        } else {
            let tile = tile.unwrap_or(1);
            let lines = tiled(count, k, tile, Line([0.0; NR]), |p, i| Line(line(p, i)));
            (Lines::F32(lines), tile)
        };
        Self { lines, tile, k, n }
    }

    /// From `w` `[k, n]` (Burn's `Linear` layout).
    pub fn from_in_out(w: &[f32], k: usize, n: usize) -> Self {
        Self::build(k, n, exact_in_bf16(w), None, |i, c| w[i * n + c])
    }

    /// From `w` `[n, k]` (an embedding read as a tied head).
    pub fn from_out_in(w: &[f32], k: usize, n: usize) -> Self {
        Self::build(k, n, exact_in_bf16(w), None, |i, c| w[c * k + i])
    }

    /// From `w` `[k, n]` (`layout` `InOut`, Burn's `Linear` layout) or `[n, k]` (`OutIn`, an
    /// embedding read as a tied head), quantized: `None` when `k` is not a multiple of [`QK`].
    pub fn quantized(
        w: &[f32],
        k: usize,
        n: usize,
        out_in: bool,
        format: Quantization,
    ) -> Option<Self> {
        if !k.is_multiple_of(QK) {
            return None;
        }
        let lines = match format {
            Quantization::Q8_0 => {
                let empty = Q8Block {
                    scale: [0.0; NR],
                    q: [[0; NR]; QK],
                };
                Lines::Q8(quantized_blocks(
                    w,
                    (k, n),
                    out_in,
                    empty,
                    |block, j, column| {
                        let (scale, q) = quantize_q8_0(column);
                        block.scale[j] = scale;
                        for (i, v) in q.into_iter().enumerate() {
                            block.q[i][j] = v;
                        }
                    },
                ))
            }
            Quantization::Q4_0 | Quantization::Q4_1 => {
                let empty = Q4Block {
                    scale: [0.0; NR],
                    min: [0.0; NR],
                    q: [[0; NR]; QK / 2],
                };
                let set = |block: &mut Q4Block, j: usize, column: &[f32; QK]| {
                    let (scale, min, q) = if format == Quantization::Q4_0 {
                        let (d, q) = quantize_q4_0(column);
                        (d, -8.0 * d, q)
                    } else {
                        quantize_q4_1(column)
                    };
                    block.scale[j] = scale;
                    block.min[j] = min;
                    for t in 0..QK / 2 {
                        block.q[t][j] = q[2 * t] | q[2 * t + 1] << 4;
                    }
                };
                Lines::Q4(quantized_blocks(w, (k, n), out_in, empty, set), format)
            }
        };
        Some(Self {
            lines,
            tile: TILE,
            k,
            n,
        })
    }

    /// Whether the lines hold bfloat16 values.
    pub fn is_bf16(&self) -> bool {
        matches!(self.lines, Lines::Bf16(_))
    }

    /// The quantized format the panels hold, if any.
    pub fn quantization(&self) -> Option<Quantization> {
        match self.lines {
            Lines::Q8(_) => Some(Quantization::Q8_0),
            Lines::Q4(_, format) => Some(format),
            _ => None,
        }
    }

    /// Index of unit `u` (a line, or a block of [`QK`] features) of panel `p`, for `per`
    /// units per panel.
    fn unit(&self, p: usize, u: usize, per: usize) -> usize {
        let (start, g) = tile_start(p, self.count(), per, self.tile);
        start + u * g
    }

    /// Weight of feature `i` for output `p * NR + j`.
    fn weight(&self, p: usize, i: usize, j: usize) -> f32 {
        let k = self.k;
        match &self.lines {
            Lines::F32(lines) => lines[self.unit(p, i, k)].0[j],
            Lines::Bf16(lines) => f32::from_bits(u32::from(lines[self.unit(p, i, k)].0[j]) << 16),
            Lines::Q8(blocks) => {
                let block = &blocks[self.unit(p, i / QK, k / QK)];
                block.scale[j] * f32::from(block.q[i % QK][j])
            }
            Lines::Q4(blocks, _) => {
                let block = &blocks[self.unit(p, i / QK, k / QK)];
                let byte = block.q[i % QK / 2][j];
                let q = if i.is_multiple_of(2) {
                    byte & 0x0f
                } else {
                    byte >> 4
                };
                f32::from(q).mul_add(block.scale[j], block.min[j])
            }
        }
    }

    fn count(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// The quantized blocks of `w` (`[k, n]`, or `[n, k]` when `out_in`): every panel's `k / QK`
/// blocks, column `j` of each set by `set(block, j, its 32 weights)`.
fn quantized_blocks<B: Copy + Send + Sync>(
    w: &[f32],
    (k, n): (usize, usize),
    out_in: bool,
    empty: B,
    set: impl Fn(&mut B, usize, &[f32; QK]) + Sync,
) -> Vec<B> {
    let at = |i: usize, c: usize| if out_in { w[c * k + i] } else { w[i * n + c] };
    tiled(n.div_ceil(NR), k / QK, TILE, empty, |p, b| {
        let mut block = empty;
        for j in 0..NR.min(n - p * NR) {
            set(
                &mut block,
                j,
                &std::array::from_fn(|i| at(b * QK + i, p * NR + j)),
            );
        }
        block
    })
}

/// Where panel `p` of `count` (`per` units each, tiles of `tile`) starts, as a unit index,
/// and how many panels its tile holds (the stride between its units).
fn tile_start(p: usize, count: usize, per: usize, tile: usize) -> (usize, usize) {
    let first = p - p % tile;
    (first * per + p % tile, tile.min(count - first))
}

/// The `per` units of each of `count` panels, `unit(p, u)`, laid out in tiles of `size`
/// panels (unit `u` of a tile's panels side by side), the tiles split over one thread per
/// core: a model's weights are packed when it is loaded for decoding, before the first token.
fn tiled<L: Copy + Send>(
    count: usize,
    per: usize,
    size: usize,
    empty: L,
    unit: impl Fn(usize, usize) -> L + Sync,
) -> Vec<L> {
    let mut units = vec![empty; count * per];
    let fill = |t: usize, tile: &mut [L]| {
        let g = size.min(count - t * size);
        for (e, slot) in tile.iter_mut().enumerate() {
            *slot = unit(t * size + e % g, e / g);
        }
    };
    let tiles = count.div_ceil(size);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let each = tiles.div_ceil(threads.min(tiles).max(1)).max(1);
    if per == 0 || threads == 1 || tiles < 2 {
        for (t, tile) in units.chunks_mut((size * per).max(1)).enumerate() {
            fill(t, tile);
        }
        return units;
    }
    std::thread::scope(|s| {
        for (part, tiles) in units.chunks_mut(each * size * per).enumerate() {
            let fill = &fill;
            s.spawn(move || {
                for (q, tile) in tiles.chunks_mut(size * per).enumerate() {
                    fill(part * each + q, tile);
                }
            });
        }
    });
    units
}

/// ggml's `quantize_row_q8_0_ref` for one block: the scale `amax / 127` rounded to f16 (and
/// returned as f32) and each weight times the inverse of the unrounded scale, rounded half away
/// from zero.
pub fn quantize_q8_0(block: &[f32; QK]) -> (f32, [i8; QK]) {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = std::array::from_fn(|i| (block[i] * id).round() as i8);
    (half::f16::from_f32(d).to_f32(), q)
}

/// ggml's `quantize_row_q4_0_ref` for one block: `d` = the value of largest magnitude over -8
/// (rounded to f16, returned as f32) and each nibble `min(15, trunc(w / d + 8.5))`.
pub fn quantize_q4_0(block: &[f32; QK]) -> (f32, [u8; QK]) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in block {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = std::array::from_fn(|i| ((block[i] * id + 8.5) as i8).min(15) as u8);
    (half::f16::from_f32(d).to_f32(), q)
}

/// ggml's `quantize_row_q4_1_ref` for one block: `d = (max - min) / 15` and `m = min` (both
/// rounded to f16, returned as f32) and each nibble `min(15, trunc((w - min) / d + 0.5))`.
pub fn quantize_q4_1(block: &[f32; QK]) -> (f32, f32, [u8; QK]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in block {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = std::array::from_fn(|i| (((block[i] - min) * id + 0.5) as i8).min(15) as u8);
    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
    (f16(d), f16(min), q)
}

/// Whether every value is a bfloat16 value (its low 16 bits zero).
fn exact_in_bf16(w: &[f32]) -> bool {
    w.iter().all(|v| v.to_bits() & 0xffff == 0)
}

/// A kernel over the panels `p0..p1`: `(x, w, out, rows, cols, p0, p1)`.
type PanelRange = unsafe fn(&[f32], &Panels, *mut f32, usize, usize, usize, usize);

/// `out[r, c] = x[r, :] · w[:, c]` for the first `cols` outputs, `x` `[rows, k]`, `out`
/// `[rows, cols]`; the widest kernel this CPU runs ([`Kernel::chosen`]), large products split
/// over the threads of the [`Pool`].
pub fn x_panels(x: &[f32], w: &Panels, out: &mut [f32], rows: usize, cols: usize) {
    assert!(cols <= w.n && x.len() >= rows * w.k && out.len() >= rows * cols);
    let kernel = Kernel::chosen().function();
    let count = cols.div_ceil(NR);
    let o = Out(out.as_mut_ptr());
    // SAFETY: the shapes are asserted above, `kernel` runs on this CPU (checked above for
    // the SIMD one), and the parts write disjoint panels.
    let run = |p0: usize, p1: usize| unsafe { kernel(x, w, o.ptr(), rows, cols, p0, p1) };
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

/// Bytes ahead of the line in use that a kernel asks the cache to fetch, in a panel of
/// untiled lines (32 f32 lines: the hardware prefetcher alone falls behind when several rows
/// share each line) and in a tile of quantized blocks.
const PREFETCH_LINES: usize = 2048;
const PREFETCH_BLOCKS: usize = 4096;

/// The hints a SIMD kernel gives before it reads feature `i` of `panels` panels from `a`
/// (`next` bytes apart, units `stride` bytes apart, `features` per unit of `unit` bytes).
/// Untiled panels stream side by side, a hint ahead in each; a tile of quantized blocks is
/// one stream that its unpacking reads too slowly for the hardware prefetcher to run ahead; a
/// tile of bfloat16 lines gets none (the hardware prefetcher keeps up, and hints slowed it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(
    a: *const u8,
    i: usize,
    panels: usize,
    (next, stride): (usize, usize),
    (features, unit): (usize, usize),
) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: hints only: past the end of the units they read nothing.
    unsafe {
        if stride == unit {
            for j in 0..panels {
                let ahead = a.wrapping_add(j * next + i * stride + PREFETCH_LINES);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
        } else if features > 1 {
            let ahead = a.wrapping_add(i * stride / features + PREFETCH_BLOCKS);
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
        }
    }
}

/// The instruction sets the product kernels come in, all computing the same chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Scalar code ([`portable`]).
    Portable,
    /// AVX2 and FMA: a panel's line is two 8-lane vectors.
    Avx2,
    /// AVX-512F: a panel's line is one 16-lane vector, twice the registers for accumulators.
    Avx512,
}

impl Kernel {
    /// The widest kernel this CPU runs, or the one `LAYERSKIP_KERNEL` names (`portable`,
    /// `avx2`, `avx512`) if this CPU runs it: for measuring one against another.
    pub fn chosen() -> Kernel {
        static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let available = Kernel::available();
            let named = std::env::var("LAYERSKIP_KERNEL").ok().and_then(|v| {
                available
                    .iter()
                    .copied()
                    .find(|k| format!("{k:?}").eq_ignore_ascii_case(&v))
            });
            named.unwrap_or(*available.last().expect("portable always runs"))
        })
    }

    /// The kernels this CPU runs, narrowest first.
    pub fn available() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                kernels.push(Kernel::Avx2);
                if has!("avx512f") {
                    kernels.push(Kernel::Avx512);
                }
            }
        }
        kernels
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
    // SAFETY: the shapes are asserted above and the CPU runs `kernel`.
    unsafe {
        (kernel.function())(x, w, out.as_mut_ptr(), rows, cols, 0, cols.div_ceil(NR));
    }
}

/// The body of each SIMD module's `panels`: that module's `run` with its loader for the
/// panels' format (`F32`, `Bf16`, `Q8`, `Q4`), the lines passed as bytes.
#[cfg(target_arch = "x86_64")]
macro_rules! run_by_format {
    ($x:expr, $w:expr, $out:expr, $rows:expr, $cols:expr, $p0:expr, $p1:expr) => {{
        let shape = super::Shape {
            k: $w.k,
            count: $w.count(),
            tile: $w.tile,
        };
        match &$w.lines {
            super::Lines::F32(l) => {
                run::<F32>($x, l.as_ptr().cast(), shape, $out, $rows, $cols, $p0, $p1)
            }
            super::Lines::Bf16(l) => {
                run::<Bf16>($x, l.as_ptr().cast(), shape, $out, $rows, $cols, $p0, $p1)
            }
            super::Lines::Q8(l) => {
                run::<Q8>($x, l.as_ptr().cast(), shape, $out, $rows, $cols, $p0, $p1)
            }
            super::Lines::Q4(l, _) => {
                run::<Q4>($x, l.as_ptr().cast(), shape, $out, $rows, $cols, $p0, $p1)
            }
        }
    }};
}

/// The reference order, in scalar code: what the SIMD kernels must reproduce bit for bit.
pub mod portable {
    use super::{NR, Panels};

    /// [`super::x_panels`] over the panels `p0..p1`, in scalar code.
    ///
    /// # Safety
    /// `out` holds `rows` rows of `cols`; `x` holds `rows` rows of `w.k`; `p1 * NR` does
    /// not pass `cols` by a whole panel.
    pub unsafe fn panels(
        x: &[f32],
        w: &Panels,
        out: *mut f32,
        rows: usize,
        cols: usize,
        p0: usize,
        p1: usize,
    ) {
        let k = w.k;
        for r in 0..rows {
            for p in p0..p1 {
                for j in 0..NR.min(cols - p * NR) {
                    let mut acc = 0.0f32;
                    for i in 0..k {
                        acc = x[r * k + i].mul_add(w.weight(p, i, j), acc);
                    }
                    // SAFETY: r < rows and p * NR + j < cols.
                    unsafe { *out.add(r * cols + p * NR + j) = acc };
                }
            }
        }
    }

    /// `x · w` for `w` `[k, n]` in its stored layout: the chains of [`panels`], for tests.
    #[cfg(test)]
    pub fn x_w(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let mut acc = 0.0f32;
                for i in 0..k {
                    acc = x[r * k + i].mul_add(w[i * n + c], acc);
                }
                out[r * n + c] = acc;
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{MR, NR, Panels, Span};

    /// How a kernel reads one feature's 16 weights of a panel as two f32 vectors.
    trait Load {
        /// Features per unit of the layout (a line: 1; a block: [`super::QK`]).
        const FEATURES: usize;
        /// Bytes per unit.
        const UNIT: usize;
        /// Feature `i` of the panel whose first unit is at `panel`, each unit `stride` bytes
        /// after the one before.
        ///
        /// # Safety
        /// `panel` is an aligned panel of this kind with more than `i` features; the CPU has
        /// AVX2.
        unsafe fn load(panel: *const u8, i: usize, stride: usize) -> [__m256; 2];
    }

    /// [`super::Line`]: 16 f32.
    struct F32;
    impl Load for F32 {
        const FEATURES: usize = 1;
        const UNIT: usize = 64;
        #[inline(always)]
        unsafe fn load(panel: *const u8, i: usize, stride: usize) -> [__m256; 2] {
            // SAFETY: as promised by the caller.
            unsafe {
                let line = panel.add(i * stride) as *const f32;
                [_mm256_load_ps(line), _mm256_load_ps(line.add(8))]
            }
        }
    }

    /// [`super::HalfLine`]: 16 bfloat16, widened exactly (shifted into the upper half).
    struct Bf16;
    impl Load for Bf16 {
        const FEATURES: usize = 1;
        const UNIT: usize = 32;
        #[inline(always)]
        unsafe fn load(panel: *const u8, i: usize, stride: usize) -> [__m256; 2] {
            // SAFETY: as promised by the caller.
            unsafe {
                let line = panel.add(i * stride) as *const __m128i;
                let widen = |h: __m128i| {
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                };
                [
                    widen(_mm_load_si128(line)),
                    widen(_mm_load_si128(line.add(1))),
                ]
            }
        }
    }

    /// [`super::Q4Block`]s: 16 nibbles, `fma(q, d, m)` per column.
    struct Q4;
    impl Load for Q4 {
        const FEATURES: usize = super::QK;
        const UNIT: usize = std::mem::size_of::<super::Q4Block>();
        #[inline(always)]
        unsafe fn load(panel: *const u8, i: usize, stride: usize) -> [__m256; 2] {
            // SAFETY: as promised by the caller.
            unsafe {
                let block = panel.add(i / super::QK * stride);
                let (d, m) = (block as *const f32, block.add(64) as *const f32);
                let bytes =
                    _mm_load_si128(block.add(128 + i % super::QK / 2 * 16) as *const __m128i);
                let nibbles = if i.is_multiple_of(2) {
                    _mm_and_si128(bytes, _mm_set1_epi8(0x0f))
                } else {
                    _mm_and_si128(_mm_srli_epi16::<4>(bytes), _mm_set1_epi8(0x0f))
                };
                let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nibbles));
                let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(nibbles)));
                [
                    _mm256_fmadd_ps(lo, _mm256_load_ps(d), _mm256_load_ps(m)),
                    _mm256_fmadd_ps(hi, _mm256_load_ps(d.add(8)), _mm256_load_ps(m.add(8))),
                ]
            }
        }
    }

    /// [`super::Q8Block`]s: 16 signed bytes times their columns' scales (exact in f32).
    struct Q8;
    impl Load for Q8 {
        const FEATURES: usize = super::QK;
        const UNIT: usize = std::mem::size_of::<super::Q8Block>();
        #[inline(always)]
        unsafe fn load(panel: *const u8, i: usize, stride: usize) -> [__m256; 2] {
            // SAFETY: as promised by the caller.
            unsafe {
                let block = panel.add(i / super::QK * stride);
                let scale = block as *const f32;
                let q = _mm_load_si128(block.add(64 + i % super::QK * 16) as *const __m128i);
                let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(q)));
                [
                    _mm256_mul_ps(lo, _mm256_load_ps(scale)),
                    _mm256_mul_ps(hi, _mm256_load_ps(scale.add(8))),
                ]
            }
        }
    }

    /// The panels `p0..p1` of `x · w`. The rows go in groups of at most [`MR`], as even as
    /// possible (7 rows: 4 + 3), each group's accumulators in registers while a panel's
    /// lines stream; groups of one or two rows take two panels at once, so that at least
    /// eight independent chains hide the FMA latency (three rows over two panels do not fit
    /// the 16 registers: the default model's 3-row pass took 1.4 ms that way, 0.96 ms one
    /// panel at a time). Panels go in pairs, every group using a pair before the next (from
    /// L1/L2 after the first group).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; as [`super::portable::panels`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panels(
        x: &[f32],
        w: &Panels,
        out: *mut f32,
        rows: usize,
        cols: usize,
        p0: usize,
        p1: usize,
    ) {
        // SAFETY: as promised by the caller.
        unsafe { run_by_format!(x, w, out, rows, cols, p0, p1) }
    }

    /// [`panels`] over lines of kind `W` from `lines`.
    ///
    /// # Safety
    /// As [`panels`], `lines` holding the panels' lines.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run<W: Load>(
        x: &[f32],
        lines: *const u8,
        shape: super::Shape,
        out: *mut f32,
        rows: usize,
        cols: usize,
        p0: usize,
        p1: usize,
    ) {
        let (k, groups) = (shape.k, rows.div_ceil(MR));
        // SAFETY: every offset stays within the shapes promised by the caller.
        unsafe {
            let layout = (W::FEATURES, W::UNIT);
            let mut p = p0;
            while p < p1 {
                let (start, step, kt) = super::span(p, p1, shape, layout);
                let two = step >= 2;
                let a = lines.add(start * W::UNIT);
                let mut r = 0;
                for g in 0..groups {
                    let size = rows / groups + usize::from(g < rows % groups);
                    let (xr, or) = (x.as_ptr().add(r * k), out.add(r * cols));
                    match (size, two) {
                        (1, true) => block::<W, 1, 2>(xr, a, or, kt, cols, p),
                        (2, true) => block::<W, 2, 2>(xr, a, or, kt, cols, p),
                        (1, false) => block::<W, 1, 1>(xr, a, or, kt, cols, p),
                        (2, false) => block::<W, 2, 1>(xr, a, or, kt, cols, p),
                        (3, _) => each::<W, 3>(xr, a, or, kt, cols, p, two),
                        (4, _) => each::<W, 4>(xr, a, or, kt, cols, p, two),
                        (5, _) => each::<W, 5>(xr, a, or, kt, cols, p, two),
                        _ => each::<W, MR>(xr, a, or, kt, cols, p, two),
                    }
                    r += size;
                }
                p += if two { 2 } else { 1 };
            }
        }
    }

    /// `G` rows against panel `p`, and panel `p + 1` too when `two`, one at a time.
    ///
    /// # Safety
    /// As [`block`] (for two panels when `two`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn each<W: Load, const G: usize>(
        x: *const f32,
        a: *const u8,
        out: *mut f32,
        kt: Span,
        cols: usize,
        p: usize,
        two: bool,
    ) {
        // SAFETY: as promised by the caller.
        unsafe {
            block::<W, G, 1>(x, a, out, kt, cols, p);
            if two {
                block::<W, G, 1>(x, a.add(kt.next), out, kt, cols, p + 1);
            }
        }
    }

    /// `G` rows against the `P` panels from `p` (the first's units from `a`, laid out as
    /// `span` says): `2 G P` chains.
    ///
    /// # Safety
    /// `x` holds `G` rows of `k`, `a` starts the units of `P` panels as `span` lays them out,
    /// `out` `G` rows of `cols` with `p * NR < cols`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<W: Load, const G: usize, const P: usize>(
        x: *const f32,
        a: *const u8,
        out: *mut f32,
        Span { k, next, stride }: Span,
        cols: usize,
        p: usize,
    ) {
        // SAFETY: as promised by the caller.
        unsafe {
            let mut acc = [[[_mm256_setzero_ps(); 2]; P]; G];
            for i in 0..k {
                super::prefetch(a, i, P, (next, stride), (W::FEATURES, W::UNIT));
                let w: [[__m256; 2]; P] =
                    std::array::from_fn(|j| W::load(a.add(j * next), i, stride));
                for (g, accg) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*x.add(g * k + i));
                    for (accj, wj) in accg.iter_mut().zip(&w) {
                        accj[0] = _mm256_fmadd_ps(xv, wj[0], accj[0]);
                        accj[1] = _mm256_fmadd_ps(xv, wj[1], accj[1]);
                    }
                }
            }
            // `j` picks the panel inside each row's accumulators.
            #[allow(clippy::needless_range_loop)]
            for j in 0..P {
                let c = (p + j) * NR;
                if c < cols {
                    let rows: [[__m256; 2]; G] = std::array::from_fn(|g| acc[g][j]);
                    store::<G>(&rows, out, cols, c);
                }
            }
        }
    }

    /// Writes `G` rows' accumulators to the columns `c..c + 16` of `out`, cut at `cols`.
    ///
    /// # Safety
    /// `out` holds `G` rows of `cols`, `c < cols`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store<const G: usize>(acc: &[[__m256; 2]; G], out: *mut f32, cols: usize, c: usize) {
        // SAFETY: as promised by the caller; partial panels go through a buffer.
        unsafe {
            for (g, accg) in acc.iter().enumerate() {
                let o = out.add(g * cols + c);
                if c + NR <= cols {
                    _mm256_storeu_ps(o, accg[0]);
                    _mm256_storeu_ps(o.add(8), accg[1]);
                } else {
                    let mut buf = [0.0f32; NR];
                    _mm256_storeu_ps(buf.as_mut_ptr(), accg[0]);
                    _mm256_storeu_ps(buf.as_mut_ptr().add(8), accg[1]);
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), o, cols - c);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{NR, Panels, Span};

    /// Most rows whose accumulators share a pass over the panels: 8 rows x 2 panels = 16 of
    /// the 32 registers, with room for the weights and a broadcast.
    const MR: usize = 8;

    /// How a kernel reads one feature's 16 weights of a panel as one f32 vector.
    trait Load {
        /// Features per unit of the layout (a line: 1; a block: [`super::QK`]).
        const FEATURES: usize;
        /// Bytes per unit.
        const UNIT: usize;
        /// Feature `i` of the panel whose first unit is at `panel`, each unit `stride` bytes
        /// after the one before.
        ///
        /// # Safety
        /// `panel` is an aligned panel of this kind with more than `i` features; the CPU has
        /// AVX-512F.
        unsafe fn load(panel: *const u8, i: usize, stride: usize) -> __m512;

        /// Features `i` and `i + 1` (`i` even, inside one unit): for blocks, one read of their
        /// bytes and scales.
        ///
        /// # Safety
        /// As [`Load::load`], for features `i` and `i + 1`.
        #[inline(always)]
        unsafe fn pair(panel: *const u8, i: usize, stride: usize) -> [__m512; 2] {
            // SAFETY: as promised by the caller.
            unsafe {
                [
                    Self::load(panel, i, stride),
                    Self::load(panel, i + 1, stride),
                ]
            }
        }
    }

    struct F32;
    impl Load for F32 {
        const FEATURES: usize = 1;
        const UNIT: usize = 64;
        #[inline(always)]
        unsafe fn load(panel: *const u8, i: usize, stride: usize) -> __m512 {
            // SAFETY: as promised by the caller.
            unsafe { _mm512_load_ps(panel.add(i * stride) as *const f32) }
        }
    }

    /// bfloat16 widened exactly: zero-extended to 32 bits, shifted into the upper half.
    struct Bf16;
    impl Load for Bf16 {
        const FEATURES: usize = 1;
        const UNIT: usize = 32;
        #[inline(always)]
        unsafe fn load(panel: *const u8, i: usize, stride: usize) -> __m512 {
            // SAFETY: as promised by the caller.
            unsafe {
                let h = _mm256_load_si256(panel.add(i * stride) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
    }

    /// [`super::Q4Block`]s: 16 nibbles, `fma(q, d, m)` per column.
    struct Q4;
    impl Load for Q4 {
        const FEATURES: usize = super::QK;
        const UNIT: usize = std::mem::size_of::<super::Q4Block>();
        #[inline(always)]
        unsafe fn load(panel: *const u8, i: usize, stride: usize) -> __m512 {
            // SAFETY: as promised by the caller.
            unsafe {
                let block = panel.add(i / super::QK * stride);
                let bytes =
                    _mm_load_si128(block.add(128 + i % super::QK / 2 * 16) as *const __m128i);
                let q = _mm512_cvtepu8_epi32(bytes);
                let q = if i.is_multiple_of(2) {
                    _mm512_and_si512(q, _mm512_set1_epi32(0x0f))
                } else {
                    _mm512_srli_epi32::<4>(q)
                };
                let d = _mm512_load_ps(block as *const f32);
                let m = _mm512_load_ps(block.add(64) as *const f32);
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), d, m)
            }
        }

        #[inline(always)]
        unsafe fn pair(panel: *const u8, i: usize, stride: usize) -> [__m512; 2] {
            // SAFETY: as promised by the caller (`i` even: its byte holds both nibbles).
            unsafe {
                let block = panel.add(i / super::QK * stride);
                let bytes =
                    _mm_load_si128(block.add(128 + i % super::QK / 2 * 16) as *const __m128i);
                let q = _mm512_cvtepu8_epi32(bytes);
                let lo = _mm512_and_si512(q, _mm512_set1_epi32(0x0f));
                let hi = _mm512_srli_epi32::<4>(q);
                let d = _mm512_load_ps(block as *const f32);
                let m = _mm512_load_ps(block.add(64) as *const f32);
                [
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m),
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m),
                ]
            }
        }
    }

    /// [`super::Q8Block`]s: 16 signed bytes times their columns' scales (exact in f32).
    struct Q8;
    impl Load for Q8 {
        const FEATURES: usize = super::QK;
        const UNIT: usize = std::mem::size_of::<super::Q8Block>();
        #[inline(always)]
        unsafe fn load(panel: *const u8, i: usize, stride: usize) -> __m512 {
            // SAFETY: as promised by the caller.
            unsafe {
                let block = panel.add(i / super::QK * stride);
                let q = _mm_load_si128(block.add(64 + i % super::QK * 16) as *const __m128i);
                let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                _mm512_mul_ps(q, _mm512_load_ps(block as *const f32))
            }
        }

        #[inline(always)]
        unsafe fn pair(panel: *const u8, i: usize, stride: usize) -> [__m512; 2] {
            // SAFETY: as promised by the caller (features `i`, `i + 1`: 32 bytes in a row).
            unsafe {
                let block = panel.add(i / super::QK * stride);
                let q = _mm256_load_si256(block.add(64 + i % super::QK * 16) as *const __m256i);
                let scale = _mm512_load_ps(block as *const f32);
                let lo = _mm512_cvtepi8_epi32(_mm256_castsi256_si128(q));
                let hi = _mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(q));
                [
                    _mm512_mul_ps(_mm512_cvtepi32_ps(lo), scale),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(hi), scale),
                ]
            }
        }
    }

    /// The panels `p0..p1` of `x · w`: rows in groups of at most [`MR`] (as even as
    /// possible), each group streaming four panels at a time when it has one or two rows
    /// (four to eight independent chains hide the FMA latency) and two otherwise.
    ///
    /// # Safety
    /// The CPU has AVX-512F; as [`super::portable::panels`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panels(
        x: &[f32],
        w: &Panels,
        out: *mut f32,
        rows: usize,
        cols: usize,
        p0: usize,
        p1: usize,
    ) {
        // SAFETY: as promised by the caller.
        unsafe { run_by_format!(x, w, out, rows, cols, p0, p1) }
    }

    /// [`panels`] over lines of kind `W`.
    ///
    /// # Safety
    /// As [`panels`], `lines` holding the panels' lines.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn run<W: Load>(
        x: &[f32],
        lines: *const u8,
        shape: super::Shape,
        out: *mut f32,
        rows: usize,
        cols: usize,
        p0: usize,
        p1: usize,
    ) {
        // A tile's panels are read all four at once (two passes over half a tile each were
        // slower than two row groups each reading it whole): groups of up to six rows, 24
        // accumulators. Panels of f32 lines, each its own stream, go in pairs for groups of
        // three or more rows, up to eight rows (16 accumulators).
        let (k, tiled) = (shape.k, shape.tile > 1);
        let mr = if tiled { 6 } else { MR };
        let groups = rows.div_ceil(mr);
        // SAFETY: every offset stays within the shapes promised by the caller.
        unsafe {
            let layout = (W::FEATURES, W::UNIT);
            let mut p = p0;
            while p < p1 {
                let (start, step, span) = super::span(p, p1, shape, layout);
                let mut r = 0;
                for g in 0..groups {
                    let size = rows / groups + usize::from(g < rows % groups);
                    let (xr, or) = (x.as_ptr().add(r * k), out.add(r * cols));
                    let mut q = 0;
                    while q < step {
                        let wide = if !tiled && size > 2 { 2 } else { 4 };
                        let take = match (step - q).min(wide) {
                            4 => 4,
                            2 | 3 => 2,
                            _ => 1,
                        };
                        let a = lines.add(start * W::UNIT + q * span.next);
                        group::<W>(size, take, xr, a, or, span, cols, p + q);
                        q += take;
                    }
                    r += size;
                }
                p += step;
            }
        }
    }

    /// `block::<W, size, panels>`.
    ///
    /// # Safety
    /// As [`block`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn group<W: Load>(
        size: usize,
        panels: usize,
        x: *const f32,
        a: *const u8,
        out: *mut f32,
        span: Span,
        cols: usize,
        p: usize,
    ) {
        macro_rules! dispatch {
            ($($g:literal),*) => {
                match (size, panels) {
                    $(
                        ($g, 4) => block::<W, $g, 4>(x, a, out, span, cols, p),
                        ($g, 2) => block::<W, $g, 2>(x, a, out, span, cols, p),
                        ($g, _) => block::<W, $g, 1>(x, a, out, span, cols, p),
                    )*
                    _ => unreachable!("groups have 1..={MR} rows"),
                }
            };
        }
        // SAFETY: as promised by the caller.
        unsafe { dispatch!(1, 2, 3, 4, 5, 6, 7, 8) }
    }

    /// `G` rows against the `P` panels from `p` (their lines from `a`): `G P` chains of 16
    /// lanes.
    ///
    /// # Safety
    /// `x` holds `G` rows of `k`, `a` starts the units of `P` panels as `span` lays them out,
    /// `out` `G` rows of `cols` with `p * NR < cols`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block<W: Load, const G: usize, const P: usize>(
        x: *const f32,
        a: *const u8,
        out: *mut f32,
        Span { k, next, stride }: Span,
        cols: usize,
        p: usize,
    ) {
        // SAFETY: as promised by the caller.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); P]; G];
            let mut i = 0;
            while i < k {
                super::prefetch(a, i, P, (next, stride), (W::FEATURES, W::UNIT));
                if W::FEATURES > 1 && G <= 2 {
                    // Blocks (`k` a multiple of 32) two features at a time: one read of each
                    // pair's bytes and scales (more rows would spill the registers). The tile
                    // stream moves up to 144 bytes a pair: a second hint a line further.
                    let ahead = i * stride / W::FEATURES + super::PREFETCH_BLOCKS + 64;
                    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(ahead) as *const i8);
                    let w: [[__m512; 2]; P] =
                        std::array::from_fn(|j| W::pair(a.add(j * next), i, stride));
                    for (g, accg) in acc.iter_mut().enumerate() {
                        let x0 = _mm512_set1_ps(*x.add(g * k + i));
                        let x1 = _mm512_set1_ps(*x.add(g * k + i + 1));
                        for (accj, wj) in accg.iter_mut().zip(&w) {
                            *accj = _mm512_fmadd_ps(x0, wj[0], *accj);
                            *accj = _mm512_fmadd_ps(x1, wj[1], *accj);
                        }
                    }
                    i += 2;
                    continue;
                }
                let w: [__m512; P] = std::array::from_fn(|j| W::load(a.add(j * next), i, stride));
                for (g, accg) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(g * k + i));
                    for (accj, wj) in accg.iter_mut().zip(&w) {
                        *accj = _mm512_fmadd_ps(xv, *wj, *accj);
                    }
                }
                i += 1;
            }
            for (g, accg) in acc.iter().enumerate() {
                for (j, accj) in accg.iter().enumerate() {
                    let c = (p + j) * NR;
                    let mask = ((1u32 << (cols - c).min(NR)) - 1) as __mmask16;
                    _mm512_mask_storeu_ps(out.add(g * cols + c), mask, *accj);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// `w` `[k, n]` transposed to `[n, k]`.
    fn transpose(w: &[f32], k: usize, n: usize) -> Vec<f32> {
        (0..n * k).map(|j| w[(j % k) * n + j / k]).collect()
    }

    fn run(x: &[f32], w: &Panels, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; rows * cols];
        x_panels(x, w, &mut out, rows, cols);
        out
    }

    fn with(kernel: Kernel, x: &[f32], w: &Panels, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; rows * cols];
        x_panels_with(kernel, x, w, &mut out, rows, cols);
        out
    }

    /// Threads' shares of the panels cover them once, in order, starting on tile boundaries
    /// (as evenly as those allow), for any thread count: more threads than tiles included.
    #[test]
    fn thread_shares_cover_the_panels_in_whole_tiles() {
        for tile in [1, TILE] {
            for count in [1, 2, 3, 5, 9, 19, 36, 3072] {
                for parts in 1..=count.min(16) {
                    let starts: Vec<usize> = (0..=parts)
                        .map(|t| share_start(t, parts, count, tile))
                        .collect();
                    assert_eq!((starts[0], starts[parts]), (0, count));
                    for t in 0..parts {
                        let (a, b) = (starts[t], starts[t + 1]);
                        assert!(a <= b && b <= count, "{count} {parts} {tile}: {starts:?}");
                        assert!(
                            a % tile == 0 || a == count,
                            "{count} {parts} {tile}: {starts:?}"
                        );
                        let even = count / parts;
                        assert!(
                            b - a <= even + 2 * tile,
                            "{count} {parts} {tile}: {starts:?}"
                        );
                    }
                }
            }
        }
    }

    /// Every kernel over any range of panels (as a thread's share of a product: starting or
    /// ending inside a tile) reproduces the scalar chains, for every layout: f32 and bfloat16
    /// lines one panel to a tile or [`TILE`] (whichever the chosen kernel packs for), and
    /// quantized blocks; tiles whole and partial (19 panels: four tiles and three panels).
    #[test]
    fn every_layout_and_range_of_panels_matches_the_scalar_order() {
        let (k, n): (usize, usize) = (64, 300);
        let count = n.div_ceil(NR);
        let w = values(k * n, 5);
        let w16: Vec<f32> = w
            .iter()
            .map(|v| f32::from_bits(v.to_bits() & 0xffff_0000))
            .collect();
        let mut layouts = Vec::new();
        for tile in [1, 2, TILE] {
            layouts.push(Panels::build(k, n, false, Some(tile), |i, c| w[i * n + c]));
            layouts.push(Panels::build(k, n, true, Some(tile), |i, c| w16[i * n + c]));
        }
        for format in [Quantization::Q8_0, Quantization::Q4_0] {
            layouts.push(Panels::quantized(&w, k, n, false, format).unwrap());
        }
        for panels in &layouts {
            let reference = dequantized(panels);
            for rows in [1, 2, 3, 7] {
                let x = values(rows * k, 40 + rows as u64);
                let want = portable::x_w(&x, &reference, rows, k, n);
                for kernel in Kernel::available() {
                    for (p0, p1) in [(0, count), (1, 3), (2, 7), (3, 4), (5, count), (17, 19)] {
                        let mut out = vec![f32::NAN; rows * n];
                        // SAFETY: the shapes fit and the kernel runs on this CPU.
                        unsafe {
                            (kernel.function())(&x, panels, out.as_mut_ptr(), rows, n, p0, p1)
                        };
                        for r in 0..rows {
                            let cols = p0 * NR..(p1 * NR).min(n);
                            assert_eq!(
                                &out[r * n..][cols.clone()],
                                &want[r * n..][cols],
                                "{kernel:?} tile {} bf16 {} {:?} rows {rows} panels {p0}..{p1}",
                                panels.tile,
                                panels.is_bf16(),
                                panels.quantization()
                            );
                        }
                    }
                }
            }
        }
    }

    /// The dispatched (SIMD, threaded) kernel and every kernel this CPU runs (scalar, AVX2,
    /// AVX-512) reproduce the scalar chains on the stored layout bit for bit, packed from either layout, in f32 or (for bfloat16 values) half
    /// the bytes, for every row count (one group, several groups, a remainder) and for widths
    /// with a partial last panel or a prefix of columns.
    #[test]
    fn simd_kernels_match_the_scalar_order_bit_for_bit() {
        let shapes = [
            (256, 768),
            (768, 256),
            (37, 11),
            (4, 1),
            (9, 300),
            (64, 4096),
        ];
        for ((k, n), bf16) in shapes.into_iter().flat_map(|s| [(s, false), (s, true)]) {
            let mut w = values(k * n, 1);
            if bf16 {
                // bfloat16 values: the panels keep them in half the bytes.
                w.iter_mut()
                    .for_each(|v| *v = f32::from_bits(v.to_bits() & 0xffff_0000));
            }
            let want_layout = Panels::from_in_out(&w, k, n);
            let from_t = Panels::from_out_in(&transpose(&w, k, n), k, n);
            assert_eq!((want_layout.is_bf16(), from_t.is_bf16()), (bf16, bf16));
            for rows in [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 17] {
                let x = values(rows * k, 2 + rows as u64);
                let want = portable::x_w(&x, &w, rows, k, n);
                for panels in [&want_layout, &from_t] {
                    assert_eq!(run(&x, panels, rows, n), want, "k {k} n {n} rows {rows}");
                    for kernel in Kernel::available() {
                        let got = with(kernel, &x, panels, rows, n);
                        assert_eq!(got, want, "{kernel:?} k {k} n {n} rows {rows}");
                    }
                }
                for cols in [1, n / 2 + 3, n - 1]
                    .into_iter()
                    .filter(|&c| c >= 1 && c <= n)
                {
                    let mut outputs = vec![run(&x, &want_layout, rows, cols)];
                    for kernel in Kernel::available() {
                        outputs.push(with(kernel, &x, &want_layout, rows, cols));
                    }
                    for got in outputs {
                        for r in 0..rows {
                            assert_eq!(
                                &got[r * cols..(r + 1) * cols],
                                &want[r * n..r * n + cols],
                                "k {k} n {n} rows {rows} cols {cols}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Q8_0 as ggml computes it, by hand: a block 0, 0.1, ..., 3.1 has amax 3.1, scale
    /// 3.1 / 127 (0.024409..., stored as the nearest f16, 0.024414062), and weight 0.1 maps to
    /// round(0.1 * 127 / 3.1) = round(4.0968) = 4, the largest to 127; an all-zero block to
    /// scale 0.
    #[test]
    fn q8_0_quantizes_as_ggml() {
        let block: [f32; QK] = std::array::from_fn(|i| i as f32 * 0.1);
        let (d, q) = quantize_q8_0(&block);
        assert_eq!(d, 0.024414062);
        assert_eq!((q[0], q[1], q[10], q[31]), (0, 4, 41, 127));
        let negative: [f32; QK] = std::array::from_fn(|i| -(i as f32) * 0.1);
        assert_eq!(quantize_q8_0(&negative).1[31], -127);
        assert_eq!(quantize_q8_0(&[0.0; QK]), (0.0, [0; QK]));
    }

    /// Q4_0 and Q4_1 as ggml computes them, by hand.
    #[test]
    fn q4_quantizes_as_ggml() {
        // Q4_0: the largest magnitude is -4, so d = -4 / -8 = 0.5; 1.0 -> trunc(2 + 8.5) = 10,
        // -4 -> 0, 3.9 -> trunc(7.8 + 8.5) = 16, clamped to 15.
        let mut block = [0.0f32; QK];
        block[..3].copy_from_slice(&[1.0, -4.0, 3.9]);
        let (d, q) = quantize_q4_0(&block);
        assert_eq!((d, q[0], q[1], q[2], q[3]), (0.5, 10, 0, 15, 8));
        // Q4_1 of 0, 0.1, ..., 3.1: m = 0, d = 3.1 / 15 (f16: 0.20666504); 0.1 -> trunc(0.48 +
        // 0.5) = 0, 0.2 -> 1, 0.4 -> 2, 3.1 -> 15.
        let block: [f32; QK] = std::array::from_fn(|i| i as f32 * 0.1);
        let (d, m, q) = quantize_q4_1(&block);
        assert_eq!((d, m), (0.20666504, 0.0));
        assert_eq!((q[1], q[2], q[4], q[31]), (0, 1, 2, 15));
    }

    /// 4-bit panels: every kernel computes the f32 chains over `fma(q, d, m)` bit for bit, and
    /// re-quantizing the dequantized weights gives them back (a Q4 file converted to f32 and
    /// packed computes with the file's numbers).
    #[test]
    fn q4_panels_compute_the_dequantized_product_bit_for_bit() {
        for format in [Quantization::Q4_0, Quantization::Q4_1] {
            for (k, n) in [(64, 48), (256, 300), (96, 5)] {
                let w = values(k * n, 13);
                let q = Panels::quantized(&w, k, n, false, format).unwrap();
                let q_t = Panels::quantized(&transpose(&w, k, n), k, n, true, format).unwrap();
                assert_eq!(q.quantization(), Some(format));
                let deq = dequantized(&q);
                assert_eq!(dequantized(&q_t), deq);
                for (a, b) in w.iter().zip(&deq) {
                    // At most a step (Q4_1: half of range / 15; Q4_0: amax / 8 where its top
                    // nibble clamps), weights below 0.5 here, plus the f16 roundings.
                    assert!((a - b).abs() <= 0.07, "{format:?} {a} vs {b}");
                }
                let again = Panels::quantized(&deq, k, n, false, format).unwrap();
                assert_eq!(dequantized(&again), deq, "{format:?} re-quantized");
                for rows in [1, 2, 3, 7, 9] {
                    let x = values(rows * k, 30 + rows as u64);
                    let want = portable::x_w(&x, &deq, rows, k, n);
                    assert_eq!(
                        run(&x, &q, rows, n),
                        want,
                        "{format:?} k {k} n {n} rows {rows}"
                    );
                    for kernel in Kernel::available() {
                        let got = with(kernel, &x, &q_t, rows, n);
                        assert_eq!(got, want, "{format:?} {kernel:?} {k} {n}");
                    }
                }
            }
        }
    }

    /// The weights a matrix's panels hold (for a quantized matrix, its dequantized weights),
    /// `[k, n]`.
    fn dequantized(w: &Panels) -> Vec<f32> {
        let (k, n) = (w.k, w.n);
        (0..k * n)
            .map(|e| w.weight(e % n / NR, e / n, e % n % NR))
            .collect()
    }

    /// Q8_0 panels: every kernel computes the f32 chains over the dequantized weights bit for
    /// bit (the scale times a byte is exact in f32), from either layout; quantizing the
    /// dequantized weights again gives the same panels (a Q8_0 file converted to f32 and packed
    /// computes with the file's numbers); widths that are not whole blocks are refused.
    #[test]
    fn q8_0_panels_compute_the_dequantized_product_bit_for_bit() {
        for (k, n) in [(64, 48), (256, 300), (96, 5)] {
            let w = values(k * n, 11);
            let q = Panels::quantized(&w, k, n, false, Quantization::Q8_0).unwrap();
            let q_t =
                Panels::quantized(&transpose(&w, k, n), k, n, true, Quantization::Q8_0).unwrap();
            assert_eq!(q.quantization(), Some(Quantization::Q8_0));
            let deq = dequantized(&q);
            assert_eq!(dequantized(&q_t), deq);
            // The error: half a step (amax / 127, amax < 0.5 here) plus the scale's f16
            // rounding (2^-11 relative) over at most 127 steps.
            for (a, b) in w.iter().zip(&deq) {
                let bound = 0.5 * 0.5 / 127.0 + 0.5 / 2048.0;
                assert!((a - b).abs() <= bound, "{a} vs {b}");
            }
            let again = Panels::quantized(&deq, k, n, false, Quantization::Q8_0).unwrap();
            assert_eq!(dequantized(&again), deq, "re-quantized");
            for rows in [1, 2, 3, 7, 9] {
                let x = values(rows * k, 20 + rows as u64);
                let want = portable::x_w(&x, &deq, rows, k, n);
                assert_eq!(run(&x, &q, rows, n), want, "k {k} n {n} rows {rows}");
                for kernel in Kernel::available() {
                    assert_eq!(with(kernel, &x, &q_t, rows, n), want, "{kernel:?} {k} {n}");
                }
            }
        }
        assert!(
            Panels::quantized(&values(40 * 16, 1), 40, 16, false, Quantization::Q8_0).is_none()
        );
    }

    /// A row's result does not depend on the rows beside it: row `r` of a many-row call
    /// equals the one-row call on that row alone (what makes verification exact).
    #[test]
    fn a_row_is_computed_the_same_whatever_the_batch() {
        let (k, n) = (768, 256);
        let w = Panels::from_in_out(&values(k * n, 7), k, n);
        for rows in [2, 5, 7, 12] {
            let x = values(rows * k, 8);
            let all = run(&x, &w, rows, n);
            for r in 0..rows {
                let one = run(&x[r * k..(r + 1) * k], &w, 1, n);
                assert_eq!(&all[r * n..(r + 1) * n], &one[..], "{rows} rows, row {r}");
            }
        }
    }

    /// Against an f64 product: the chains are accurate sums, not just self-consistent.
    #[test]
    fn kernels_compute_the_product() {
        let (rows, k, n) = (3, 300, 70);
        let (x, w) = (values(rows * k, 3), values(k * n, 4));
        let out = run(&x, &Panels::from_in_out(&w, k, n), rows, n);
        // The same numbers read as an embedding `[n, k]`: another product.
        let out_t = run(&x, &Panels::from_out_in(&w, k, n), rows, n);
        for r in 0..rows {
            for c in 0..n {
                let exact: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[i * n + c] as f64)
                    .sum();
                assert!((out[r * n + c] as f64 - exact).abs() < 1e-4, "x_w {r} {c}");
                let exact_t: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                    .sum();
                assert!(
                    (out_t[r * n + c] as f64 - exact_t).abs() < 1e-4,
                    "x_wt {r} {c}"
                );
            }
        }
    }
}
