//! Rotary position embeddings in the rotate-half layout of Hugging Face Llama checkpoints,
//! with optional Llama 3 frequency scaling.

use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::config::RopeConfig;

/// The rotary frequencies of one head width. Holds no tensors: the cos/sin tables for the positions
/// a forward pass needs are built on the fly (a few KB), so the model needs no position buffer.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

/// The cos/sin tables for a run of positions.
///
/// # Shapes
/// - `cos`, `sin`: `[1, 1, seq, head_dim]` (each half repeats the `head_dim / 2` frequencies).
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `cos(position * inv_freq)`.
    pub cos: Tensor<B, 4>,
    /// `sin(position * inv_freq)`.
    pub sin: Tensor<B, 4>,
}

impl Rope {
    /// Frequencies for `head_dim` with the given settings (Hugging Face's `_compute_llama3_parameters`
    /// for Llama 3 scaling).
    pub fn new(config: &RopeConfig, head_dim: usize) -> Self {
        let mut inv_freq: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / config.theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        if let Some(s) = config.llama3_scaling {
            let old_len = s.original_max_position_embeddings as f64;
            let low_freq_wavelen = old_len / s.low_freq_factor;
            let high_freq_wavelen = old_len / s.high_freq_factor;
            for f in &mut inv_freq {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_freq_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_freq_wavelen {
                    let smooth = (old_len / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        Self { inv_freq }
    }

    /// The tables for positions `start..start + len`.
    pub fn tables<B: Backend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> RopeTables<B> {
        let half = self.inv_freq.len();
        let dim = 2 * half;
        let mut cos = Vec::with_capacity(len * dim);
        let mut sin = Vec::with_capacity(len * dim);
        for pos in start..start + len {
            // HF computes the angles in f32; the difference to f64 is far below the test tolerance.
            let row: Vec<f64> = self.inv_freq.iter().map(|f| pos as f64 * f).collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos() as f32));
                sin.extend(row.iter().map(|a| a.sin() as f32));
            }
        }
        let shape = [1, 1, len, dim];
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }
}
