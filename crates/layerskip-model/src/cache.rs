//! Preallocated caches: the per-layer KV cache and the exit-hidden cache of self-speculation.
//!
//! Both are written at positions into buffers allocated once, so rolling back after a rejected
//! draft is only a change of length ([`KvCache::truncate`]).

use burn::tensor::{Tensor, backend::Backend};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

/// Appends `new` at `len` into a preallocated buffer along `dim` and returns the filled prefix.
///
/// The buffer is taken out of its `Option` so that it is uniquely owned while assigned: Burn then
/// writes in place instead of copying the whole buffer (see BURN-NOTES.md).
fn append_along<B: Backend, const D: usize>(
    buffer: &mut Option<Tensor<B, D>>,
    len: usize,
    new: Tensor<B, D>,
    dim: usize,
) -> Result<Tensor<B, D>> {
    let buf = buffer.take().expect("cache buffer present");
    let capacity = buf.dims()[dim];
    let added = new.dims()[dim];
    if len + added > capacity {
        *buffer = Some(buf);
        return Err(ModelError::ContextOverflow {
            requested: len + added,
            capacity,
        });
    }
    let dims = new.dims();
    let ranges: [std::ops::Range<usize>; D] = std::array::from_fn(|d| {
        if d == dim {
            len..len + added
        } else {
            0..dims[d]
        }
    });
    #[cfg(feature = "flex")]
    let buf = if crate::flex::can_write_along::<B>(buf.dtype(), new.dtype()) {
        crate::flex::write_along(buf, len, new, dim)
    } else {
        buf.slice_assign(ranges, new)
    };
    #[cfg(not(feature = "flex"))]
    let buf = buf.slice_assign(ranges, new);
    let prefix: [std::ops::Range<usize>; D] =
        std::array::from_fn(|d| if d == dim { 0..len + added } else { 0..dims[d] });
    let filled = buf.clone().slice(prefix);
    *buffer = Some(buf);
    Ok(filled)
}

/// The keys and values of one decoder layer.
///
/// # Shapes
/// - buffers: `[batch, num_kv_heads, capacity, head_dim]`
#[derive(Debug, Clone)]
pub struct LayerKvCache<B: Backend> {
    keys: Option<Tensor<B, 4>>,
    values: Option<Tensor<B, 4>>,
    len: usize,
}

impl<B: Backend> LayerKvCache<B> {
    fn new(shape: [usize; 4], device: &B::Device) -> Self {
        Self {
            keys: Some(Tensor::zeros(shape, device)),
            values: Some(Tensor::zeros(shape, device)),
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the keys/values of new positions and returns all keys/values held, new ones included.
    ///
    /// # Shapes
    /// - `keys`, `values`: `[batch, num_kv_heads, new, head_dim]`
    /// - returned: `[batch, num_kv_heads, len + new, head_dim]` each
    pub fn append(
        &mut self,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        let added = keys.dims()[2];
        let k = append_along(&mut self.keys, self.len, keys, 2)?;
        let v = append_along(&mut self.values, self.len, values, 2)?;
        self.len += added;
        Ok((k, v))
    }
}

/// A KV cache for every decoder layer, preallocated to a fixed capacity. Each layer keeps its own
/// length, so early layers can run ahead of the deep ones during self-speculative drafting.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerKvCache<B>>,
    capacity: usize,
    bytes: usize,
}

impl<B: Backend> KvCache<B> {
    /// Allocates a cache for `batch` sequences of up to `capacity` positions.
    pub fn new(config: &LlamaConfig, batch: usize, capacity: usize, device: &B::Device) -> Self {
        let shape = [batch, config.num_kv_heads, capacity, config.head_dim];
        let layers: Vec<LayerKvCache<B>> = (0..config.num_layers)
            .map(|_| LayerKvCache::new(shape, device))
            .collect();
        // The device's compute dtype (f32 unless set to f16/bf16), not the backend's nominal one.
        let elem = layers
            .first()
            .and_then(|l| l.keys.as_ref())
            .map_or(4, |k| k.dtype().size());
        let bytes = 2 * config.num_layers * shape.iter().product::<usize>() * elem;
        Self {
            layers,
            capacity,
            bytes,
        }
    }

    /// Positions each buffer can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes allocated for keys and values of all layers.
    pub fn allocated_bytes(&self) -> usize {
        self.bytes
    }

    /// Positions held by `layer`.
    pub fn len(&self, layer: usize) -> usize {
        self.layers[layer].len
    }

    /// The per-layer caches, for callers that drive layers one by one.
    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerKvCache<B> {
        &mut self.layers[layer]
    }

    /// Cuts every layer to at most `len` positions. Costs nothing: the buffers stay allocated and
    /// later appends overwrite the stale positions.
    pub fn truncate(&mut self, len: usize) {
        for layer in &mut self.layers {
            layer.len = layer.len.min(len);
        }
    }

    /// Empties every layer.
    pub fn clear(&mut self) {
        self.truncate(0);
    }
}

/// The residual stream at the exit layer for every drafted position (the "exit hidden" cache of
/// self-speculative decoding): the verifier resumes from it instead of recomputing layers `< E`.
///
/// # Shapes
/// - buffer: `[batch, capacity, hidden]`
#[derive(Debug, Clone)]
pub struct ExitHiddenCache<B: Backend> {
    buffer: Option<Tensor<B, 3>>,
    len: usize,
}

impl<B: Backend> ExitHiddenCache<B> {
    /// Allocates room for `capacity` positions of width `hidden`.
    pub fn new(batch: usize, capacity: usize, hidden: usize, device: &B::Device) -> Self {
        Self {
            buffer: Some(Tensor::zeros([batch, capacity, hidden], device)),
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends hidden states `[batch, new, hidden]`.
    pub fn append(&mut self, hidden: Tensor<B, 3>) -> Result<()> {
        let added = hidden.dims()[1];
        append_along(&mut self.buffer, self.len, hidden, 1)?;
        self.len += added;
        Ok(())
    }

    /// The hidden states of positions `start..len`: `[batch, len - start, hidden]`.
    pub fn since(&self, start: usize) -> Tensor<B, 3> {
        let buf = self.buffer.as_ref().expect("cache buffer present");
        buf.clone().slice_dim(1, start..self.len)
    }

    /// Cuts to at most `len` positions (free).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{FloatDType, TensorData};

    fn ramp(shape: [usize; 4], from: f32) -> Tensor<Flex, 4> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| from + i as f32).collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    /// Appends, a rollback (truncate) and an overwriting append leave exactly the expected
    /// positions, per head, in f32 and in the half dtypes (Flex writes in place for these).
    #[test]
    fn appends_after_rollback_overwrite_the_stale_positions() {
        for dtype in [None, Some(FloatDType::F16), Some(FloatDType::BF16)] {
            let device = Default::default();
            let cast = |t: Tensor<Flex, 4>| match dtype {
                Some(d) => t.cast(d),
                None => t,
            };
            let mut layer = LayerKvCache::<Flex>::new([1, 2, 8, 3], &device);
            if let Some(d) = dtype {
                layer.keys = layer.keys.map(|t| t.cast(d));
                layer.values = layer.values.map(|t| t.cast(d));
            }
            let a = cast(ramp([1, 2, 3, 3], 0.0));
            let b = cast(ramp([1, 2, 2, 3], 100.0));
            let c = cast(ramp([1, 2, 1, 3], 200.0));
            layer.append(a.clone(), a.clone()).unwrap();
            layer.append(b.clone(), b).unwrap();
            layer.len = 4; // roll back the second append's last position
            let (keys, values) = layer.append(c.clone(), c.clone()).unwrap();
            let first_b = cast(ramp([1, 2, 2, 3], 100.0)).slice_dim(2, 0..1);
            let want = Tensor::cat(vec![a, first_b, c], 2);
            let want = want.into_data().convert::<f32>().to_vec::<f32>().unwrap();
            for got in [keys, values] {
                assert_eq!(got.dims(), [1, 2, 5, 3]);
                let got = got.into_data().convert::<f32>().to_vec::<f32>().unwrap();
                assert_eq!(got, want, "{dtype:?}");
            }
            assert!(
                layer
                    .append(cast(ramp([1, 2, 4, 3], 0.0)), cast(ramp([1, 2, 4, 3], 0.0)))
                    .is_err()
            );
        }
    }
}
