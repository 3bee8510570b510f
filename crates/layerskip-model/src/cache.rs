//! Preallocated caches: the per-layer KV cache and the exit-hidden cache of self-speculation.
//!
//! Both are written at positions into buffers, so rolling back after a rejected draft is only a
//! change of length ([`KvCache::truncate`]). The KV buffers start at room for
//! [`KV_FIRST_ALLOCATION`] positions and double when a store needs more, up to the capacity:
//! a short generation in a long context does not hold (or touch) memory for the whole context.

use burn::tensor::{Tensor, backend::Backend};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::ops::LayerSkipBackend;
use crate::rope::RopeTables;

/// An error when `added` positions after `len` do not fit in `capacity`.
fn check_room(len: usize, added: usize, capacity: usize) -> Result<()> {
    if len + added > capacity {
        return Err(ModelError::ContextOverflow {
            requested: len + added,
            capacity,
        });
    }
    Ok(())
}

/// Positions a layer's KV buffers hold room for at first (or the capacity, if smaller); they
/// double from there as stores need more.
pub const KV_FIRST_ALLOCATION: usize = 256;

/// The keys and values of one decoder layer: buffers and the number of positions they hold.
/// Attention reads the buffers ([`LayerKvCache::buffers`]); the cache only stores.
///
/// # Shapes
/// - buffers: `[batch, num_kv_heads, allocated, head_dim]`, `allocated <= capacity`
#[derive(Debug, Clone)]
pub struct LayerKvCache<B: Backend> {
    /// Keys and values. `None` only inside [`LayerKvCache::store`], which moves them out so that
    /// a backend can write into storage the cache holds alone.
    buffers: Option<[Tensor<B, 4>; 2]>,
    len: usize,
    /// The most positions the buffers may grow to.
    capacity: usize,
}

impl<B: LayerSkipBackend> LayerKvCache<B> {
    /// Buffers of `[batch, kv_heads, capacity, head_dim]` = `shape`, allocated for
    /// [`KV_FIRST_ALLOCATION`] positions at first.
    fn new(shape: [usize; 4], device: &B::Device) -> Self {
        let [batch, heads, capacity, dim] = shape;
        let first = [batch, heads, capacity.min(KV_FIRST_ALLOCATION), dim];
        Self {
            buffers: Some([Tensor::zeros(first, device), Tensor::zeros(first, device)]),
            len: 0,
            capacity,
        }
    }

    /// Positions the buffers have room for now.
    pub fn allocated(&self) -> usize {
        self.buffers()[0].dims()[2]
    }

    /// Reallocates the buffers with room for at least `needed` positions (doubling, at most the
    /// capacity), the held positions copied over.
    fn grow(&mut self, needed: usize) {
        let mut allocated = self.allocated();
        while allocated < needed {
            allocated *= 2;
        }
        let allocated = allocated.min(self.capacity);
        let len = self.len;
        let buffers = self
            .buffers
            .take()
            .expect("buffers are back after every store");
        self.buffers = Some(buffers.map(|old| {
            let [batch, heads, _, dim] = old.dims();
            let rest = Tensor::<B, 4>::zeros([batch, heads, allocated - len, dim], &old.device())
                .cast(old.dtype());
            Tensor::cat(vec![old.slice_dim(2, 0..len), rest], 2)
        }));
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key and value buffers (every position, the first [`len`](Self::len) held).
    pub fn buffers(&self) -> [&Tensor<B, 4>; 2] {
        let [k, v] = self
            .buffers
            .as_ref()
            .expect("buffers are back after every store");
        [k, v]
    }

    /// Stores the keys (rotated with `tables` on the way in) and values of new positions after
    /// the ones held; an error past the capacity.
    ///
    /// # Shapes
    /// - `keys`, `values`: `[batch, new, num_kv_heads, head_dim]` (the projections' layout)
    pub fn store(
        &mut self,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        tables: &RopeTables<B>,
    ) -> Result<()> {
        let added = keys.dims()[1];
        self.store_with(added, |buffers, at| {
            ((), B::store_kv(buffers, at, keys, values, tables))
        })
    }

    /// Stores `added` new positions after the ones held by `write`, which takes the buffers and
    /// the first new position and returns them written (and a value of its own, returned); an
    /// error past the capacity, before `write` runs.
    pub(crate) fn store_with<T>(
        &mut self,
        added: usize,
        write: impl FnOnce([Tensor<B, 4>; 2], usize) -> (T, [Tensor<B, 4>; 2]),
    ) -> Result<T> {
        check_room(self.len, added, self.capacity)?;
        if self.len + added > self.allocated() {
            self.grow(self.len + added);
        }
        let buffers = self
            .buffers
            .take()
            .expect("buffers are back after every store");
        let (out, buffers) = write(buffers, self.len);
        self.buffers = Some(buffers);
        self.len += added;
        Ok(out)
    }
}

/// A KV cache for every decoder layer, of a fixed capacity (its buffers grow to it as needed).
/// Each layer keeps its own length, so early layers can run ahead of the deep ones during
/// self-speculative drafting.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerKvCache<B>>,
    capacity: usize,
    /// Bytes of one position's keys and values in one layer.
    layer_position_bytes: usize,
}

impl<B: LayerSkipBackend> KvCache<B> {
    /// A cache for `batch` sequences of up to `capacity` positions.
    pub fn new(config: &LlamaConfig, batch: usize, capacity: usize, device: &B::Device) -> Self {
        let shape = [batch, config.num_kv_heads, capacity, config.head_dim];
        let layers: Vec<LayerKvCache<B>> = (0..config.num_layers)
            .map(|_| LayerKvCache::new(shape, device))
            .collect();
        // The device's compute dtype (f32 unless set to f16/bf16), not the backend's nominal one.
        let elem = layers.first().map_or(4, |l| l.buffers()[0].dtype().size());
        Self {
            layers,
            capacity,
            layer_position_bytes: 2 * batch * config.num_kv_heads * config.head_dim * elem,
        }
    }

    /// Positions each layer can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes allocated now for keys and values of all layers.
    pub fn allocated_bytes(&self) -> usize {
        let positions: usize = self.layers.iter().map(LayerKvCache::allocated).sum();
        positions * self.layer_position_bytes
    }

    /// Bytes of one position's keys and values in every layer.
    pub fn position_bytes(&self) -> usize {
        self.layers.len() * self.layer_position_bytes
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

impl<B: LayerSkipBackend> ExitHiddenCache<B> {
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
        let capacity = self
            .buffer
            .as_ref()
            .expect("the buffer is back after every append")
            .dims()[1];
        check_room(self.len, added, capacity)?;
        let buffer = self
            .buffer
            .take()
            .expect("the buffer is back after every append");
        self.buffer = Some(B::write_at(buffer, 1, self.len, hidden));
        self.len += added;
        Ok(())
    }

    /// The hidden states of positions `start..len`: `[batch, len - start, hidden]`.
    pub fn since(&self, start: usize) -> Tensor<B, 3> {
        let buf = self
            .buffer
            .as_ref()
            .expect("the buffer is back after every append");
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

    /// Rotary tables that leave keys unchanged (cos 1, sin 0) for `seq` positions.
    fn identity_tables(seq: usize, d: usize, dtype: Option<FloatDType>) -> RopeTables<Flex> {
        let device = Default::default();
        let cast = |t: Tensor<Flex, 4>| dtype.map_or(t.clone(), |d| t.cast(d));
        RopeTables {
            cos: cast(Tensor::ones([1, 1, seq, d], &device)),
            sin: cast(Tensor::zeros([1, 1, seq, d], &device)),
        }
    }

    /// Stores, a rollback (truncate) and an overwriting store leave exactly the expected
    /// positions, per head, in f32 and in the half dtypes (Flex writes in place for these).
    #[test]
    fn stores_after_rollback_overwrite_the_stale_positions() {
        for dtype in [None, Some(FloatDType::F16), Some(FloatDType::BF16)] {
            let device = Default::default();
            let cast = |t: Tensor<Flex, 4>| match dtype {
                Some(d) => t.cast(d),
                None => t,
            };
            let mut layer = LayerKvCache::<Flex>::new([1, 2, 8, 3], &device);
            if let Some(d) = dtype {
                layer.buffers = layer.buffers.map(|b| b.map(|t| t.cast(d)));
            }
            // Head-major `[1, kv_heads, new, 3]`; the cache takes the projections' layout.
            let a = cast(ramp([1, 2, 3, 3], 0.0));
            let b = cast(ramp([1, 2, 2, 3], 100.0));
            let c = cast(ramp([1, 2, 1, 3], 200.0));
            let store = |layer: &mut LayerKvCache<Flex>, t: &Tensor<Flex, 4>| {
                let seq_major = t.clone().swap_dims(1, 2);
                let tables = identity_tables(t.dims()[2], 3, dtype);
                layer.store(seq_major.clone(), seq_major, &tables)
            };
            store(&mut layer, &a).unwrap();
            store(&mut layer, &b).unwrap();
            layer.len = 4; // roll back the second store's last position
            store(&mut layer, &c).unwrap();
            assert_eq!(layer.len(), 5);
            let first_b = cast(ramp([1, 2, 2, 3], 100.0)).slice_dim(2, 0..1);
            let want = Tensor::cat(vec![a, first_b, c], 2);
            let want = want.into_data().convert::<f32>().to_vec::<f32>().unwrap();
            for got in layer.buffers() {
                let got = got.clone().slice_dim(2, 0..5);
                let got = got.into_data().convert::<f32>().to_vec::<f32>().unwrap();
                assert_eq!(got, want, "{dtype:?}");
            }
            assert!(store(&mut layer, &cast(ramp([1, 2, 4, 3], 0.0))).is_err());
        }
    }
}
