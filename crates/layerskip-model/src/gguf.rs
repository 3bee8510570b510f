//! A reader for GGUF files (llama.cpp's format): metadata, tensor directory, and dequantisation of
//! the tensor types small Llama checkpoints ship in (F32, F16, BF16, Q4_0, Q4_1, Q8_0).
//!
//! The file is memory-mapped; a tensor is dequantised only when asked for.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{ModelError, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any integer type, widened.
    Int(i64),
    /// f32 or f64, widened.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an integer, if it is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            GgufValue::Int(v) => Some(*v),
            _ => None,
        }
    }

    /// The value as a float (integers are converted).
    pub fn as_float(&self) -> Option<f64> {
        match self {
            GgufValue::Float(v) => Some(*v),
            GgufValue::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lies in the file.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    /// Dimensions in GGUF order (`ne[0]` varies fastest), i.e. the reverse of the row-major shape.
    pub dims: Vec<usize>,
    /// The ggml type id.
    pub ggml_type: u32,
    /// Byte offset from the start of the data section.
    pub offset: usize,
}

impl GgufTensorInfo {
    /// The row-major shape (PyTorch order).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    /// Elements, or `None` if the product overflows.
    fn numel(&self) -> Option<usize> {
        self.dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor directory by name.
    pub tensors: BTreeMap<String, GgufTensorInfo>,
    data_start: usize,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| ModelError::parse(self.path, "truncated GGUF file"))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len())
            .ok_or_else(|| {
                ModelError::parse(self.path, format!("implausible length {n} in GGUF header"))
            })
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| ModelError::parse(self.path, "non-UTF-8 string in GGUF header"))
    }

    /// A value of type `kind`; arrays may nest `depth` more levels.
    fn value(&mut self, kind: u32, depth: usize) -> Result<GgufValue> {
        let b = |c: &mut Self, n| c.take(n).map(|s| s.to_vec());
        Ok(match kind {
            0 => GgufValue::Int(b(self, 1)?[0] as i64),
            1 => GgufValue::Int(b(self, 1)?[0] as i8 as i64),
            2 => GgufValue::Int(u16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i64),
            3 => GgufValue::Int(i16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i64),
            4 => GgufValue::Int(self.u32()? as i64),
            5 => GgufValue::Int(self.u32()? as i32 as i64),
            6 => GgufValue::Float(f32::from_le_bytes(b(self, 4)?.try_into().unwrap()) as f64),
            7 => GgufValue::Bool(b(self, 1)?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 if depth == 0 => {
                return Err(ModelError::parse(
                    self.path,
                    "GGUF arrays nested too deeply",
                ));
            }
            9 => {
                let item = self.u32()?;
                let n = self.len()?;
                GgufValue::Array(
                    (0..n)
                        .map(|_| self.value(item, depth - 1))
                        .collect::<Result<_>>()?,
                )
            }
            10 => GgufValue::Int(self.u64()? as i64),
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            other => {
                return Err(ModelError::parse(
                    self.path,
                    format!("unknown GGUF value type {other}"),
                ));
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses the header of a GGUF (version 2 or 3) file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: read-only map; the file is not expected to change while converting.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let mut c = Cursor {
            bytes: &mmap,
            pos: 0,
            path,
        };
        if c.take(4)? != b"GGUF" {
            return Err(ModelError::parse(path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::parse(
                path,
                format!("unsupported GGUF version {version}"),
            ));
        }
        let (n_tensors, n_kv) = (c.len()?, c.len()?);
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let kind = c.u32()?;
            metadata.insert(key, c.value(kind, 4)?);
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            let dims = (0..n_dims).map(|_| c.len()).collect::<Result<Vec<_>>>()?;
            let ggml_type = c.u32()?;
            let offset = c.len()?;
            tensors.insert(
                name,
                GgufTensorInfo {
                    dims,
                    ggml_type,
                    offset,
                },
            );
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_int)
            .unwrap_or(32);
        if !(1..=1 << 16).contains(&alignment) {
            return Err(ModelError::parse(
                path,
                format!("general.alignment {alignment} is not a plausible alignment"),
            ));
        }
        let alignment = alignment as usize;
        let data_start = c.pos.div_ceil(alignment) * alignment;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            metadata,
            tensors,
            data_start,
        })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A required metadata value, or an error naming the file and the key.
    pub fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key)
            .ok_or_else(|| ModelError::parse(&self.path, format!("missing metadata key {key:?}")))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Dequantises tensor `name` to f32, in row-major order.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
            })?;
        let n = info.numel().ok_or_else(|| {
            ModelError::parse(
                &self.path,
                format!("{name}: dimensions {:?} overflow", info.dims),
            )
        })?;
        let (block, block_bytes) =
            block_layout(info.ggml_type).ok_or_else(|| ModelError::UnsupportedDtype {
                path: self.path.clone(),
                name: name.into(),
                dtype: format!("ggml type {}", info.ggml_type),
            })?;
        if n % block != 0 {
            return Err(ModelError::parse(
                &self.path,
                format!("{name}: {n} elements is not a multiple of {block}"),
            ));
        }
        let end = (n / block)
            .checked_mul(block_bytes)
            .and_then(|len| len.checked_add(self.data_start)?.checked_add(info.offset));
        let bytes = end.and_then(|end| self.mmap.get(self.data_start + info.offset..end));
        let bytes = bytes.ok_or_else(|| {
            ModelError::parse(
                &self.path,
                format!("{name}: data lies beyond the end of the file"),
            )
        })?;
        let mut out = Vec::with_capacity(n);
        for chunk in bytes.chunks_exact(block_bytes) {
            dequantize_block(info.ggml_type, chunk, &mut out);
        }
        Ok(out)
    }
}

/// (elements per block, bytes per block) of the supported ggml types.
fn block_layout(ggml_type: u32) -> Option<(usize, usize)> {
    match ggml_type {
        0 => Some((1, 4)),   // F32
        1 => Some((1, 2)),   // F16
        30 => Some((1, 2)),  // BF16
        2 => Some((32, 18)), // Q4_0: f16 scale, 16 bytes of nibbles
        3 => Some((32, 20)), // Q4_1: f16 scale, f16 min, 16 bytes of nibbles
        8 => Some((32, 34)), // Q8_0: f16 scale, 32 i8
        _ => None,
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Appends the values of one block. For the 4-bit types, element `j < 16` is the low nibble of
/// byte `j` and element `j + 16` its high nibble (ggml's layout).
fn dequantize_block(ggml_type: u32, b: &[u8], out: &mut Vec<f32>) {
    match ggml_type {
        0 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        1 => out.push(f16_at(b, 0)),
        30 => out.push(half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        2 | 3 => {
            let d = f16_at(b, 0);
            let (min, qs) = if ggml_type == 3 {
                (f16_at(b, 2), &b[4..20])
            } else {
                (-8.0 * d, &b[2..18])
            };
            out.extend(qs.iter().map(|q| (q & 0x0f) as f32 * d + min));
            out.extend(qs.iter().map(|q| (q >> 4) as f32 * d + min));
        }
        8 => {
            let d = f16_at(b, 0);
            out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
        }
        _ => unreachable!("checked by block_layout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.5, m = -1.0; byte j holds low nibble j % 16 and high nibble 15 - j % 16.
        let mut block = Vec::new();
        block.extend(half::f16::from_f32(0.5).to_le_bytes());
        block.extend(half::f16::from_f32(-1.0).to_le_bytes());
        block.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
        let mut out = Vec::new();
        dequantize_block(3, &block, &mut out);
        assert_eq!(out[0], -1.0);
        assert_eq!(out[3], 0.5);
        assert_eq!(out[15], 6.5);
        assert_eq!(out[16], 6.5); // high nibble of byte 0 = 15
        assert_eq!(out[31], -1.0);
    }

    #[test]
    fn q8_0_and_q4_0_blocks_by_hand() {
        let mut block = half::f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = Vec::new();
        dequantize_block(8, &block, &mut out);
        assert_eq!(out[0], -4.0);
        assert_eq!(out[31], 3.75);
        let mut block = half::f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend([0x80u8; 16]); // low nibble 0 -> -16, high nibble 8 -> 0
        let mut out = Vec::new();
        dequantize_block(2, &block, &mut out);
        assert_eq!(out[0], -16.0);
        assert_eq!(out[16], 0.0);
    }
}
