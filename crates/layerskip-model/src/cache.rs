//! Preallocated caches: the per-layer KV cache and the exit-hidden cache of self-speculation.
//!
//! Both are written at positions into buffers allocated once, so rolling back after a rejected
//! draft is only a change of length ([`KvCache::truncate`]).

use burn::tensor::{Tensor, backend::Backend};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

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

/// Writes `new` at `len..` along `dim` of the preallocated buffer (an error past capacity).
fn write_along<B: Backend, const D: usize>(
    buffer: &mut Option<Tensor<B, D>>,
    len: usize,
    new: Tensor<B, D>,
    dim: usize,
) -> Result<()> {
    let capacity = buffer.as_ref().expect("cache buffer present").dims()[dim];
    let added = new.dims()[dim];
    check_room(len, added, capacity)?;
    let buf = buffer.take().expect("cache buffer present");
    #[cfg(feature = "flex")]
    if crate::flex::can_write_along::<B>(buf.dtype(), new.dtype()) {
        *buffer = Some(crate::flex::write_along(buf, len, new, dim));
        return Ok(());
    }
    let dims = new.dims();
    let ranges: [std::ops::Range<usize>; D] = std::array::from_fn(|d| {
        if d == dim {
            len..len + added
        } else {
            0..dims[d]
        }
    });
    *buffer = Some(buf.slice_assign(ranges, new));
    Ok(())
}

/// The first `len` positions along `dim` of a buffer (a view).
fn prefix<B: Backend, const D: usize>(
    buffer: &Option<Tensor<B, D>>,
    len: usize,
    dim: usize,
) -> Tensor<B, D> {
    let buf = buffer.as_ref().expect("cache buffer present");
    buf.clone().slice_dim(dim, 0..len)
}

/// Appends `new` along `dim` and returns the filled prefix `[.., 0..len + added, ..]`.
fn append_along<B: Backend, const D: usize>(
    buffer: &mut Option<Tensor<B, D>>,
    len: usize,
    new: Tensor<B, D>,
    dim: usize,
) -> Result<Tensor<B, D>> {
    let added = new.dims()[dim];
    write_along(buffer, len, new, dim)?;
    Ok(prefix(buffer, len + added, dim))
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

    /// [`append`](Self::append), returning keys and values with each kv head repeated `groups`
    /// times, `[batch, kv_heads * groups, len, head_dim]`: what grouped-query attention reads.
    /// On Flex the result is gathered straight from the buffer with block copies (a cached
    /// prefix is a strided view, and Flex copies strided views element by element: 14% of a
    /// decode step).
    pub fn append_for_heads(
        &mut self,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        groups: usize,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        #[cfg(feature = "flex")]
        if crate::flex::can_gather_heads::<B>(keys.dtype()) {
            let added = keys.dims()[2];
            write_along(&mut self.keys, self.len, keys, 2)?;
            write_along(&mut self.values, self.len, values, 2)?;
            self.len += added;
            let gather = |buf: &Option<Tensor<B, 4>>| {
                let buf = buf.as_ref().expect("cache buffer present");
                crate::flex::gather_heads(buf, self.len, groups)
            };
            return Ok((gather(&self.keys), gather(&self.values)));
        }
        let (k, v) = self.append(keys, values)?;
        Ok((
            crate::layer::repeat_kv(k, groups),
            crate::layer::repeat_kv(v, groups),
        ))
    }

    /// Whether [`attend`](Self::attend) takes these new rows (Flex, f32, at most
    /// [`MAX_ROWS`](crate::rows::MAX_ROWS) rows).
    #[cfg(feature = "flex")]
    pub(crate) fn can_attend(&self, q: &Tensor<B, 4>) -> bool {
        let buf = self.keys.as_ref().map(|k| k.dtype());
        buf.is_some_and(|buf| crate::flex::can_attend::<B>(&[q.dtype(), buf], q.dims()[1]))
    }

    /// Appends new keys and values and returns causal grouped-query attention of the new
    /// queries over everything held, reading the buffers in place (Flex only, see
    /// [`can_attend`](Self::can_attend)).
    ///
    /// # Shapes
    /// - `q`: `[batch, new, heads, head_dim]`; `keys`, `values`: `[batch, new, kv_heads,
    ///   head_dim]` (the projections' layout, rotated)
    /// - returned: `[batch, new, heads * head_dim]`
    #[cfg(feature = "flex")]
    pub(crate) fn attend(
        &mut self,
        q: Tensor<B, 4>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        groups: usize,
    ) -> Result<Tensor<B, 3>> {
        let added = keys.dims()[1];
        let capacity = self.keys.as_ref().expect("cache buffer present").dims()[2];
        check_room(self.len, added, capacity)?;
        let (k, v) = (
            self.keys.take().expect("cache buffer present"),
            self.values.take().expect("cache buffer present"),
        );
        let k = crate::flex::write_seq_major(k, self.len, keys);
        let v = crate::flex::write_seq_major(v, self.len, values);
        self.len += added;
        let out = crate::flex::attend(q, &k, &v, self.len, groups);
        (self.keys, self.values) = (Some(k), Some(v));
        Ok(out)
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
            layer.append(b.clone(), b.clone()).unwrap();
            layer.len = 4; // roll back the second append's last position
            let (keys, values) = layer.append(c.clone(), c.clone()).unwrap();
            // The same history through `append_for_heads`: each kv head repeated, same values.
            let mut grouped = LayerKvCache::<Flex>::new([1, 2, 8, 3], &device);
            if let Some(d) = dtype {
                grouped.keys = grouped.keys.map(|t| t.cast(d));
                grouped.values = grouped.values.map(|t| t.cast(d));
            }
            grouped.append_for_heads(a.clone(), a.clone(), 3).unwrap();
            grouped.append_for_heads(b.clone(), b.clone(), 3).unwrap();
            grouped.len = 4;
            let (gk, gv) = grouped.append_for_heads(c.clone(), c.clone(), 3).unwrap();
            for (got, plain) in [(gk, keys.clone()), (gv, values.clone())] {
                assert_eq!(got.dims(), [1, 6, 5, 3]);
                let want = crate::layer::repeat_kv(plain, 3);
                assert_eq!(
                    got.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
                    want.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
                    "grouped {dtype:?}"
                );
            }
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
