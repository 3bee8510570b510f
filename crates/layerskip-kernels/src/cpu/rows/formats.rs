//! The packed weight formats: f32 and bf16 lines, ggml's Q8_0/Q4_0/Q4_1 blocks (with their
//! reference quantizers), and [`Panels`], a weight matrix packed in them.

use super::*;

/// One feature's weights for one panel's 16 output columns, on its own cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Line(pub [f32; NR]);

/// [`Line`] for weights that are exact in bfloat16: the upper 16 bits of each f32, half a
/// cache line.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct HalfLine(pub [u16; NR]);

/// Two [`HalfLine`]s on one cache line: how panels of bfloat16 lines hold them. In tiled panels the
/// pair is feature `i` of panels `2m` and `2m + 1` of a tile, interleaved column by column:
/// 32-bit word `c` holds the even panel's column `c` in its low half and the odd panel's in its
/// high half, so that one 64-byte read widens into both panels' lines with one shift and one
/// mask.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct HalfPair(pub [u16; 2 * NR]);

impl HalfPair {
    /// The pair of `a` (the even panel's line) and `b`, interleaved or `plain`.
    fn new(a: &HalfLine, b: &HalfLine, plain: bool) -> Self {
        HalfPair(std::array::from_fn(|e| {
            if plain {
                if e < NR { a.0[e] } else { b.0[e - NR] }
            } else {
                [a, b][e % 2].0[e / 2]
            }
        }))
    }

    /// Column `j` of line `half` (0: the first, or the even panel's) of the pair.
    fn get(&self, half: usize, j: usize, plain: bool) -> u16 {
        if plain {
            self.0[half * NR + j]
        } else {
            self.0[2 * j + half]
        }
    }
}

/// Features per block of the 8-bit format ([`Q8Block`]), as in ggml's Q8_0.
pub const QK: usize = 32;

/// One panel's weights for [`QK`] consecutive features in ggml's Q8_0 format, kept quantized:
/// per output column a scale `d` (an f16 value, held as f32) and 32 signed bytes `q`, the
/// weight being `d * q`, which f32 holds exactly (an 11-bit by 8-bit product). The bytes go in
/// groups of four features, `q[h][j]` holding features `4h..4h + 4` of column `j`: one 32-bit
/// lane per column, as an integer dot-product instruction (`vpdpbusd`) reads them. 576 bytes
/// for 512 weights, against 1024 in bfloat16.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Q8Block {
    pub(super) scale: [f32; NR],
    pub(super) q: [[[i8; 4]; NR]; QK / 4],
}

/// One panel's weights for [`QK`] consecutive features in a 4-bit format (ggml's Q4_0 or
/// Q4_1), kept quantized: per output column a scale `d` and an offset `m` (f16 values, kept in
/// f16 as in ggml's blocks) and 32 nibbles `q`, the weight being `fma(q, d, m)` (`q * d` is exact, so this is the
/// value ggml's dequantisation computes; Q4_0 is the case `m = -8 d`). Byte `q[h][j][t]`
/// holds feature `4h + t`'s nibble for column `j` in its low half and feature `16 + 4h + t`'s in
/// its high half: one 64-byte read, masked or shifted, gives two groups of four features in a
/// 32-bit lane per column (as [`Q8Block`]). 320 bytes for 512 weights (Q4_0 holds its `m` too:
/// one layout for both formats).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Q4Block {
    pub(super) scale: [u16; NR],
    pub(super) min: [u16; NR],
    pub(super) q: [[[u8; 4]; NR]; QK / 8],
}

/// The lines of a [`Panels`].
pub(super) enum Lines {
    F32(Vec<Line>),
    /// Every weight is a bfloat16 value (a checkpoint stored in bf16, computed in f32): the
    /// same numbers in half the bytes, so the kernels' products do not change. Line `e` is
    /// half `e % 2` of pair `e / 2`; tiled panels come in pairs (a tile of an odd count of
    /// panels gets a zero panel), their lines interleaved ([`HalfPair`]).
    Bf16(Vec<HalfPair>),
    /// Quantized to 8 bits: block `p * k / QK + b` holds panel `p`'s features `b * QK..`.
    Q8(Vec<Q8Block>),
    /// Quantized to 4 bits, blocks as [`Lines::Q8`].
    Q4(Vec<Q4Block>, Quantization),
}

/// A quantized format the panels can hold weights in (`--quantize`): ggml's block formats,
/// quantized by ggml's reference quantizers; products with them quantize the activations to 8
/// bits per block and sum each block in integers ([`super::int8`]), as llama.cpp does. Weights
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
    pub(super) lines: Lines,
    /// Panels per tile: [`TILE`] for quantized blocks, for bfloat16 lines read by the AVX-512
    /// kernel (which reads a tile's four panels at once), and for f32 lines read by it on one
    /// thread; 1 otherwise (f32 lines on several threads, and lines for the AVX2 kernel, which
    /// reads one or two panels at a time).
    pub(super) tile: usize,
    pub(super) k: usize,
    pub(super) n: usize,
}

impl Panels {
    /// Panels of `weight(feature, output)`, in bfloat16 lines when `bf16`, `tile` panels to a
    /// tile (`None`: the chosen kernel's layout, as the `tile` field says).
    pub(super) fn build(
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
            let half =
                |p: usize, i: usize| HalfLine(line(p, i).map(|v| (v.to_bits() >> 16) as u16));
            let pairs = if tile > 1 {
                // Pairs of panels laid out as panels in tiles of `tile / 2`: the same places
                // as the tiled lines, with no second copy of the matrix while it is packed.
                let empty = HalfPair([0; 2 * NR]);
                tiled(count.div_ceil(2), k, tile / 2, empty, |pp, i| {
                    HalfPair::new(&half(2 * pp, i), &half(2 * pp + 1, i), false)
                })
            } else {
                let lines = tiled(count, k, tile, HalfLine([0; NR]), half);
                let zero = HalfLine([0; NR]);
                lines
                    .chunks(2)
                    .map(|two| HalfPair::new(&two[0], two.get(1).unwrap_or(&zero), true))
                    .collect()
            };
            (Lines::Bf16(pairs), tile)
        } else {
            // One core draws more from one stream than from four; two draw more from four.
            let one_core = Kernel::chosen() == Kernel::Avx512 && Pool::global().threads() == 1;
            let tile = tile.unwrap_or(if one_core { TILE } else { 1 });
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
                    q: [[[0; 4]; NR]; QK / 4],
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
                            block.q[i / 4][j][i % 4] = v;
                        }
                    },
                ))
            }
            Quantization::Q4_0 | Quantization::Q4_1 => {
                let empty = Q4Block {
                    scale: [0; NR],
                    min: [0; NR],
                    q: [[[0; 4]; NR]; QK / 8],
                };
                let set = |block: &mut Q4Block, j: usize, column: &[f32; QK]| {
                    let (scale, min, q) = if format == Quantization::Q4_0 {
                        let (d, q) = quantize_q4_0(column);
                        (d, -8.0 * d, q)
                    } else {
                        quantize_q4_1(column)
                    };
                    // Both are f16 values already: exact in f16.
                    block.scale[j] = half::f16::from_f32(scale).to_bits();
                    block.min[j] = half::f16::from_f32(min).to_bits();
                    for f in 0..QK / 2 {
                        block.q[f / 4][j][f % 4] = q[f] | q[f + QK / 2] << 4;
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
    pub(super) fn unit(&self, p: usize, u: usize, per: usize) -> usize {
        let (start, g) = tile_start(p, self.count(), per, self.tile);
        start + u * g
    }

    /// Weight of feature `i` for output `p * NR + j`.
    pub(super) fn weight(&self, p: usize, i: usize, j: usize) -> f32 {
        let k = self.k;
        match &self.lines {
            Lines::F32(lines) => lines[self.unit(p, i, k)].0[j],
            Lines::Bf16(_) => self.half_line(self.unit(p, i, k), j),
            Lines::Q8(_) | Lines::Q4(..) => {
                let (d, m) = self.block_scales(p, i / QK, j);
                let q = self.integer_weight(p, i, j) as f32;
                if self.quantization() == Some(Quantization::Q8_0) {
                    d * q
                } else {
                    q.mul_add(d, m)
                }
            }
        }
    }

    /// The integer `q` of feature `i`'s weight for output `p * NR + j` in quantized panels:
    /// Q8_0's signed byte, a 4-bit format's nibble (0 in other formats).
    pub(super) fn integer_weight(&self, p: usize, i: usize, j: usize) -> i32 {
        let per = self.k / QK;
        let f = i % QK;
        match &self.lines {
            Lines::Q8(blocks) => i32::from(blocks[self.unit(p, i / QK, per)].q[f / 4][j][f % 4]),
            Lines::Q4(blocks, _) => {
                let byte = blocks[self.unit(p, i / QK, per)].q[f % 16 / 4][j][f % 4];
                i32::from(if f < QK / 2 { byte & 0x0f } else { byte >> 4 })
            }
            _ => 0,
        }
    }

    /// Block `b`'s scale `d` and offset `m` for output `p * NR + j` in quantized panels (Q8_0:
    /// `m` = 0).
    pub(super) fn block_scales(&self, p: usize, b: usize, j: usize) -> (f32, f32) {
        let per = self.k / QK;
        match &self.lines {
            Lines::Q8(blocks) => (blocks[self.unit(p, b, per)].scale[j], 0.0),
            Lines::Q4(blocks, _) => {
                let block = &blocks[self.unit(p, b, per)];
                let f32_of = |bits: u16| half::f16::from_bits(bits).to_f32();
                (f32_of(block.scale[j]), f32_of(block.min[j]))
            }
            _ => (0.0, 0.0),
        }
    }

    /// What a kernel needs of the layout: features, panels, panels per tile.
    pub(super) fn shape(&self) -> Shape {
        Shape {
            k: self.k,
            count: self.count(),
            tile: self.tile,
        }
    }

    /// Column `j` of bfloat16 line `e`, widened.
    fn half_line(&self, e: usize, j: usize) -> f32 {
        let Lines::Bf16(pairs) = &self.lines else {
            unreachable!("bfloat16 lines")
        };
        f32::from_bits(u32::from(pairs[e / 2].get(e % 2, j, self.tile == 1)) << 16)
    }

    /// Panels in the layout: those of the `n` outputs, and a zero panel that pairs the last
    /// one in tiled bfloat16 lines.
    pub(super) fn count(&self) -> usize {
        let count = self.n.div_ceil(NR);
        if self.is_bf16() && self.tile > 1 {
            count.next_multiple_of(2)
        } else {
            count
        }
    }

    /// Output `c`'s `k` weights, as the products read them (a quantized format's values
    /// rebuilt by its definition): an embedding's row `c` when the panels hold it as a tied
    /// head.
    pub fn column(&self, c: usize, out: &mut [f32]) {
        assert!(
            c < self.n && out.len() >= self.k,
            "column {c} of {}",
            self.n
        );
        let (p, j, k) = (c / NR, c % NR, self.k);
        let out = &mut out[..k];
        // Lines: feature `i` of panel `p` is line `start + i * g` (see `unit`).
        let (start, g) = tile_start(p, self.count(), k, self.tile);
        match &self.lines {
            Lines::F32(lines) => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = lines[start + i * g].0[j];
                }
            }
            Lines::Bf16(_) => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = self.half_line(start + i * g, j);
                }
            }
            Lines::Q8(_) | Lines::Q4(..) => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = self.weight(p, i, j);
                }
            }
        }
    }

    /// Input features `k` and outputs `n`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// The quantized blocks of `w` (`[k, n]`, or `[n, k]` when `out_in`): every panel's `k / QK`
/// blocks, column `j` of each set by `set(block, j, its 32 weights)`.
pub(super) fn quantized_blocks<B: Copy + Send + Sync>(
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
pub(super) fn tile_start(p: usize, count: usize, per: usize, tile: usize) -> (usize, usize) {
    let first = p - p % tile;
    (first * per + p % tile, tile.min(count - first))
}

/// The `per` units of each of `count` panels, `unit(p, u)`, laid out in tiles of `size`
/// panels (unit `u` of a tile's panels side by side), the tiles split over one thread per
/// core: a model's weights are packed when it is loaded for decoding, before the first token.
pub(super) fn tiled<L: Copy + Send>(
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
pub(super) fn exact_in_bf16(w: &[f32]) -> bool {
    w.iter().all(|v| v.to_bits() & 0xffff == 0)
}
