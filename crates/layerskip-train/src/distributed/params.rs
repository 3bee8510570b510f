//! What the nodes of a run must agree on about the model: parameter ids numbered alike, which
//! parameters have a gradient, and a fingerprint of the weights and the data.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use layerskip_model::LlamaModel;

/// `model` with parameter ids `1, 2, ...` in visiting order. Burn draws ids at random in each
/// process, and the all-reduce of gradients pairs tensors by id (sorted), so the nodes of a run
/// must share them: a fresh run numbers them; a resumed one reads them from its checkpoint.
pub fn number_params<M: Backend>(model: LlamaModel<M>) -> LlamaModel<M> {
    struct Numbering(u64);
    impl<M: Backend> ModuleMapper<M> for Numbering {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<M, D>>) -> Param<Tensor<M, D>> {
            let (_, tensor, mapper) = param.consume();
            self.0 += 1;
            Param::from_mapped_value(ParamId::from(self.0), tensor, mapper)
        }
    }
    model.map(&mut Numbering(0))
}

/// Which of `model`'s parameters have a gradient in `grads`, in visiting order. A node whose
/// shard skipped a layer entirely (layer dropout) has none for that layer's parameters.
pub fn gradient_presence<A: AutodiffBackend>(
    model: &LlamaModel<A>,
    grads: &GradientsParams,
) -> Vec<bool> {
    struct Presence<'a>(&'a GradientsParams, Vec<bool>);
    impl<A: AutodiffBackend> ModuleVisitor<A> for Presence<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
            let has = self.0.get::<A::InnerBackend, D>(param.id).is_some();
            self.1.push(has);
        }
    }
    let mut presence = Presence(grads, Vec::new());
    model.visit(&mut presence);
    presence.1
}

/// FNV-1a, stable across builds and machines (unlike std's hasher, which may change).
#[derive(Debug, Clone, Copy)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    /// Mixes `bytes` in.
    pub fn mix(mut self, bytes: &[u8]) -> Self {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// Mixes in the sum of every parameter tensor of `model` (cheap, and different for any two
    /// checkpoints one would mix up).
    pub fn mix_weights<M: Backend>(self, model: &LlamaModel<M>) -> Self {
        struct Sums(Vec<u8>);
        impl<M: Backend> ModuleVisitor<M> for Sums {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<M, D>>) {
                let sum: f64 = param.val().sum().into_scalar().elem();
                self.0.extend(sum.to_le_bytes());
            }
        }
        let mut sums = Sums(Vec::new());
        model.visit(&mut sums);
        self.mix(&sums.0)
    }

    /// Mixes in every parameter id of `model`, in visiting order.
    pub fn mix_param_ids<M: Backend>(self, model: &LlamaModel<M>) -> Self {
        struct Ids(Vec<u8>);
        impl<M: Backend> ModuleVisitor<M> for Ids {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<M, D>>) {
                self.0.extend(param.id.val().to_le_bytes());
            }
        }
        let mut ids = Ids(Vec::new());
        model.visit(&mut ids);
        self.mix(&ids.0)
    }

    /// The hash.
    pub fn value(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_its_published_vectors() {
        // From the FNV reference (draft-eastlake-fnv): FNV-1a 64 of "" and of "a".
        assert_eq!(Fingerprint::default().value(), 0xcbf29ce484222325);
        assert_eq!(Fingerprint::default().mix(b"a").value(), 0xaf63dc4c8601ec8c);
        assert_eq!(
            Fingerprint::default().mix(b"foobar").value(),
            0x85944171f73967e8
        );
    }
}
