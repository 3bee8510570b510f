//! Hugging Face checkpoints: `config.json` + `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), f32/f16/bf16 on disk, memory-mapped and loaded tensor by
//! tensor into the backend's compute dtype; and saving in the same layout.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::{Tensor, TensorData, backend::Backend};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::layer::{Attention, DecoderLayer, Mlp};
use crate::model::LlamaModel;
use crate::ops::{LayerSkipBackend, Packed, Quantization, WeightLayout};

mod files;

pub use files::{
    RECOMMENDATION_FILE, Recommendation, SaveDtype, TOKENIZER_FILES, TensorBytes,
    read_tokenizer_files, write_atomic, write_safetensors_atomic,
};

/// The memory-mapped safetensors files of one checkpoint, indexed by tensor name.
pub struct SafetensorsFiles {
    shards: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, usize>,
    origin: PathBuf,
}

impl SafetensorsFiles {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`, in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.is_file() {
            vec![single.clone()]
        } else if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::parse(&index_path, e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::parse(&index_path, "no \"weight_map\" object"))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json found",
                ),
            ));
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the file is only read; a checkpoint modified while loading is the user's error.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let names = SafeTensors::deserialize(&mmap)
                .map_err(|e| ModelError::parse(&path, format!("not a safetensors file: {e}")))?
                .names()
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>();
            for name in names {
                index.insert(name, shards.len());
            }
            shards.push((path, mmap));
        }
        let origin = if index_path.is_file() && !single.is_file() {
            index_path
        } else {
            single
        };
        Ok(Self {
            shards,
            index,
            origin,
        })
    }

    /// The highest decoder layer index among the tensor names (`model.layers.N.*`), if any.
    pub fn last_layer(&self) -> Option<usize> {
        self.index
            .keys()
            .filter_map(|name| {
                name.strip_prefix("model.layers.")?
                    .split('.')
                    .next()?
                    .parse()
                    .ok()
            })
            .max()
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Reads tensor `name`, checks its shape, and converts it to f32.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let &shard = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.origin.clone(),
                name: name.into(),
            })?;
        let (path, mmap) = &self.shards[shard];
        let tensors =
            SafeTensors::deserialize(mmap).map_err(|e| ModelError::parse(path, e.to_string()))?;
        let view = tensors
            .tensor(name)
            .map_err(|e| ModelError::parse(path, e.to_string()))?;
        if view.shape() != expected {
            return Err(ModelError::WrongShape {
                path: path.clone(),
                name: name.into(),
                expected: expected.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let bytes = view.data();
        let convert: fn(&[u8]) -> f32 = match view.dtype() {
            Dtype::F32 => |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            Dtype::F16 => |c| half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
            Dtype::BF16 => |c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: path.clone(),
                    name: name.into(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let width = view.dtype().bitsize() / 8;
        // Converted a few megabytes at a time, each part's file pages dropped once read, so
        // that a tensor is not held twice (its file pages and its values) while it loads.
        let mut values = Vec::with_capacity(bytes.len() / width);
        for part in bytes.chunks(RELEASE_BYTES) {
            values.extend(part.chunks_exact(width).map(convert));
            release(mmap, part);
        }
        release(mmap, bytes);
        // A NaN or infinite weight makes every output it touches meaningless; some paths (a
        // softmax's max, say) can hide it, so it is refused here, by name.
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::parse(
                path,
                format!(
                    "tensor {name} holds a non-finite value ({} at index {at}); the checkpoint is damaged",
                    values[at]
                ),
            ));
        }
        Ok(values)
    }

    fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let values = self.read_f32(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// A Hugging Face `[out, in]` weight as a Burn linear layer (`[in, out]`).
    fn linear<B: Backend>(
        &self,
        name: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<Linear<B>> {
        let hf = self.read_f32(name, &[d_out, d_in])?;
        // Transpose on the host: a transposed *view* as the weight makes every matmul take a
        // strided path (measured 13-34x slower on Flex for decode-sized products; on CUDA,
        // training at a quarter of the speed, see docs/results/gpu-2026-11-27-h200-run3).
        let mut values = vec![0.0f32; hf.len()];
        for (o, row) in hf.chunks_exact(d_in).enumerate() {
            for (i, v) in row.iter().enumerate() {
                values[i * d_out + o] = *v;
            }
        }
        let weight = Tensor::from_data(TensorData::new(values, [d_in, d_out]), device);
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias: None,
        })
    }

    fn rms_norm<B: Backend>(
        &self,
        name: &str,
        config: &LlamaConfig,
        device: &B::Device,
    ) -> Result<RmsNorm<B>> {
        let gamma = self.tensor(name, [config.hidden_size], device)?;
        Ok(RmsNorm {
            gamma: Param::from_tensor(gamma),
            epsilon: config.rms_norm_eps,
        })
    }
}

/// The config and the opened safetensors files of a checkpoint directory.
fn open_checkpoint(dir: &Path) -> Result<(LlamaConfig, SafetensorsFiles)> {
    if !dir.is_dir() {
        return Err(ModelError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        ));
    }
    let config = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
    let files = SafetensorsFiles::open(dir)?;
    Ok((config, files))
}

impl<B: LayerSkipBackend> LlamaModel<B> {
    /// [`LlamaModel::from_pretrained`] then [`LlamaModel::into_decoding_only`], layer by layer:
    /// each layer's weights are prepared (quantized if asked) and their loaded copies released
    /// as soon as the layer is read, so the loaded model and the prepared one are never held
    /// together (the peak memory is about the prepared model's).
    pub fn from_pretrained_for_decoding(
        dir: &Path,
        device: &B::Device,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        /// Each part prepared and released as it is read; a tied embedding first of all (its
        /// loaded copy and its packed one are then the only large tensors held).
        struct Decoding(Option<Quantization>);
        impl<B: LayerSkipBackend> OnLoad<B> for Decoding {
            fn layer(&mut self, layer: &mut DecoderLayer<B>) -> Result<()> {
                layer.release_for_decoding(self.0)
            }
            fn tied_embedding(&mut self, embed: &mut Param<Tensor<B, 2>>) -> Result<Packed> {
                let packed = Packed::default();
                B::prepare(embed.val(), WeightLayout::OutIn, self.0, &packed)?;
                if let Some(stand_in) = B::release(embed.val(), &packed) {
                    *embed = embed.clone().map(|_| stand_in);
                }
                Ok(packed)
            }
        }
        let (config, files) = open_checkpoint(dir)?;
        let mut model = Self::load(&config, &files, device, &mut Decoding(quantize))?;
        model.release_head_for_decoding(quantize, false)?;
        Ok(model)
    }
}

/// What a loader does with each part of the model as soon as it is read (nothing, by default).
trait OnLoad<B: Backend> {
    fn layer(&mut self, layer: &mut DecoderLayer<B>) -> Result<()> {
        let _ = layer;
        Ok(())
    }

    /// A tied embedding (the head too): the backend state of the head read from it.
    fn tied_embedding(&mut self, embed: &mut Param<Tensor<B, 2>>) -> Result<Packed> {
        let _ = embed;
        Ok(Packed::default())
    }
}

/// Loading as it is.
struct Plain;
impl<B: Backend> OnLoad<B> for Plain {}

impl<B: Backend> LlamaModel<B> {
    /// Loads a Hugging Face Llama checkpoint directory (`config.json` + safetensors).
    pub fn from_pretrained(dir: &Path, device: &B::Device) -> Result<Self> {
        let (config, files) = open_checkpoint(dir)?;
        Self::from_safetensors(&config, &files, device)
    }

    /// Builds the model from already opened safetensors files.
    pub fn from_safetensors(
        config: &LlamaConfig,
        files: &SafetensorsFiles,
        device: &B::Device,
    ) -> Result<Self> {
        Self::load(config, files, device, &mut Plain)
    }

    /// [`LlamaModel::from_safetensors`], handing each part to `on` as soon as it is read.
    fn load(
        config: &LlamaConfig,
        files: &SafetensorsFiles,
        device: &B::Device,
        on: &mut dyn OnLoad<B>,
    ) -> Result<Self> {
        if let Some(last) = files.last_layer()
            && last >= config.num_layers
        {
            return Err(ModelError::parse(
                &files.origin,
                format!(
                    "holds decoder layer {last} but config.json says num_hidden_layers = {}; \
                     the config does not describe these weights",
                    config.num_layers
                ),
            ));
        }
        let (h, v) = (config.hidden_size, config.vocab_size);
        let mut embed =
            Param::from_tensor(files.tensor("model.embed_tokens.weight", [v, h], device)?);
        let head_packed = if config.tie_word_embeddings {
            on.tied_embedding(&mut embed)?
        } else {
            Packed::default()
        };
        let layers = (0..config.num_layers)
            .map(|l| {
                let mut layer = load_layer(files, config, l, device)?;
                on.layer(&mut layer)?;
                Ok(layer)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = files.rms_norm("model.norm.weight", config, device)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(files.linear("lm_head.weight", h, v, device)?)
        };
        let mut model = Self::from_parts(embed, layers, norm, lm_head, config.clone());
        model.set_head_packed(head_packed);
        Ok(model)
    }

    /// Writes `config.json` and `model.safetensors` in the Hugging Face layout (loadable by
    /// `transformers`' `LlamaForCausalLM.from_pretrained`). Each file is written to a temporary
    /// name and renamed, so a crash never leaves a half-written checkpoint.
    pub fn save_pretrained(&self, dir: &Path, dtype: SaveDtype) -> Result<()> {
        if self.is_decoding_only() {
            return Err(ModelError::Unsupported(
                "a decoding-only model holds its weights packed for the kernels and cannot be \
                 saved: load the checkpoint again"
                    .into(),
            ));
        }
        if dir.exists() && !dir.is_dir() {
            return Err(ModelError::parse(dir, "exists and is not a directory"));
        }
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let mut tensors: BTreeMap<String, Flat> = BTreeMap::new();
        tensors.insert(
            "model.embed_tokens.weight".into(),
            flat(self.embed_tokens.val()),
        );
        for (l, layer) in self.layers.iter().enumerate() {
            for (name, weight) in layer_weights(layer) {
                tensors.insert(format!("model.layers.{l}.{name}"), weight);
            }
        }
        tensors.insert("model.norm.weight".into(), flat(self.norm.gamma.val()));
        if let Some(head) = &self.lm_head {
            tensors.insert("lm_head.weight".into(), flat(head.weight.val().transpose()));
        }
        let encoded = tensors
            .into_iter()
            .map(|(name, (shape, values))| TensorBytes::new(name, shape, &values, dtype))
            .collect();
        write_safetensors_atomic(&dir.join("model.safetensors"), encoded)?;
        let config = serde_json::to_string_pretty(&self.config().to_hf(dtype.torch_name()))
            .expect("serialisable config");
        write_atomic(&dir.join("config.json"), config.as_bytes())
    }
}

/// Lets the OS take back the pages of `bytes` (a tensor of `mmap` already converted) from this
/// process: a checkpoint's mapped file would otherwise stay resident beside the tensors made
/// from it until the model is built (a 540 MB f32 SmolLM2 file doubled the peak memory of
/// loading it). The mapping is a read-only view of the file, so a later read of the same bytes
/// faults them in again from the file, unchanged. A hint: errors are ignored.
/// Bytes of a tensor converted between releases of its file pages (a multiple of the page).
const RELEASE_BYTES: usize = 4 << 20;

fn release(mmap: &Mmap, bytes: &[u8]) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let offset = bytes.as_ptr() as usize - mmap.as_ptr() as usize;
        let start = offset.next_multiple_of(PAGE);
        let end = (offset + bytes.len()) / PAGE * PAGE;
        if end > start {
            // SAFETY: a read-only shared file mapping: dropping its pages does not change what
            // a read returns (they come back from the file), and no slice of these pages is
            // used after this call (the tensor's values are copied out).
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
    #[cfg(not(unix))]
    let _ = (mmap, bytes);
}

fn load_layer<B: Backend>(
    files: &SafetensorsFiles,
    c: &LlamaConfig,
    l: usize,
    device: &B::Device,
) -> Result<DecoderLayer<B>> {
    let p = |n: &str| format!("model.layers.{l}.{n}.weight");
    let (h, hd) = (c.hidden_size, c.head_dim);
    let self_attn = Attention {
        q_proj: files.linear(&p("self_attn.q_proj"), h, c.num_heads * hd, device)?,
        k_proj: files.linear(&p("self_attn.k_proj"), h, c.num_kv_heads * hd, device)?,
        v_proj: files.linear(&p("self_attn.v_proj"), h, c.num_kv_heads * hd, device)?,
        o_proj: files.linear(&p("self_attn.o_proj"), c.num_heads * hd, h, device)?,
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: hd,
        packed: Default::default(),
    };
    let mlp = Mlp {
        gate_proj: files.linear(&p("mlp.gate_proj"), h, c.intermediate_size, device)?,
        up_proj: files.linear(&p("mlp.up_proj"), h, c.intermediate_size, device)?,
        down_proj: files.linear(&p("mlp.down_proj"), c.intermediate_size, h, device)?,
        packed: Default::default(),
    };
    Ok(DecoderLayer {
        self_attn,
        mlp,
        input_layernorm: files.rms_norm(&p("input_layernorm"), c, device)?,
        post_attention_layernorm: files.rms_norm(&p("post_attention_layernorm"), c, device)?,
    })
}

/// A tensor's shape and values, as written to disk.
type Flat = (Vec<usize>, Vec<f32>);

fn flat<B: Backend, const D: usize>(t: Tensor<B, D>) -> Flat {
    let shape = t.dims().to_vec();
    let values = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("float tensor data");
    (shape, values)
}

/// A layer's weights under their Hugging Face names, in the `[out, in]` layout.
fn layer_weights<B: Backend>(layer: &DecoderLayer<B>) -> Vec<(&'static str, Flat)> {
    let lin = |l: &Linear<B>| flat(l.weight.val().transpose());
    let a = &layer.self_attn;
    vec![
        ("self_attn.q_proj.weight", lin(&a.q_proj)),
        ("self_attn.k_proj.weight", lin(&a.k_proj)),
        ("self_attn.v_proj.weight", lin(&a.v_proj)),
        ("self_attn.o_proj.weight", lin(&a.o_proj)),
        ("mlp.gate_proj.weight", lin(&layer.mlp.gate_proj)),
        ("mlp.up_proj.weight", lin(&layer.mlp.up_proj)),
        ("mlp.down_proj.weight", lin(&layer.mlp.down_proj)),
        (
            "input_layernorm.weight",
            flat(layer.input_layernorm.gamma.val()),
        ),
        (
            "post_attention_layernorm.weight",
            flat(layer.post_attention_layernorm.gamma.val()),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NaN or infinite weight is refused at load, naming the tensor and the index, in every
    /// stored dtype.
    #[test]
    fn a_non_finite_weight_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("layerskip-nonfinite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (bad, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
            for dtype in [SaveDtype::F32, SaveDtype::Bf16, SaveDtype::F16] {
                let mut b = vec![0.5f32; 128];
                b[77] = bad;
                let tensors = vec![
                    TensorBytes::new("a", vec![4], &[1.0; 4], dtype),
                    TensorBytes::new("b", vec![2, 64], &b, dtype),
                ];
                write_safetensors_atomic(&dir.join("model.safetensors"), tensors).unwrap();
                let files = SafetensorsFiles::open(&dir).unwrap();
                assert!(files.read_f32("a", &[4]).is_ok());
                let err = files.read_f32("b", &[2, 64]).unwrap_err().to_string();
                assert!(
                    err.contains("tensor b") && err.contains(&format!("{shown} at index 77")),
                    "{dtype:?}: {err}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Reading a tensor gives the stored values, again after its pages were handed back to
    /// the OS ([`release`]), and its neighbours' values are untouched: tensors of several
    /// pages, in each stored dtype, one of them unaligned to a page.
    #[test]
    fn tensors_read_the_same_after_their_pages_are_released() {
        let dir = std::env::temp_dir().join(format!("layerskip-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values = |len: usize, seed: f32| -> Vec<f32> {
            (0..len).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
        };
        let (a, b, c) = (values(3001, 1.0), values(8192, 2.0), values(5000, 3.0));
        let dtypes = [SaveDtype::F32, SaveDtype::Bf16, SaveDtype::F16];
        for dtype in dtypes {
            let tensors = vec![
                TensorBytes::new("a", vec![3001], &a, dtype),
                TensorBytes::new("b", vec![64, 128], &b, dtype),
                TensorBytes::new("c", vec![5000], &c, dtype),
            ];
            write_safetensors_atomic(&dir.join("model.safetensors"), tensors).unwrap();
            let files = SafetensorsFiles::open(&dir).unwrap();
            let stored = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .map(|&x| match dtype {
                        SaveDtype::F32 => x,
                        SaveDtype::Bf16 => half::bf16::from_f32(x).to_f32(),
                        SaveDtype::F16 => half::f16::from_f32(x).to_f32(),
                    })
                    .collect()
            };
            for _ in 0..2 {
                assert_eq!(
                    files.read_f32("b", &[64, 128]).unwrap(),
                    stored(&b),
                    "{dtype:?}"
                );
                assert_eq!(
                    files.read_f32("a", &[3001]).unwrap(),
                    stored(&a),
                    "{dtype:?}"
                );
                assert_eq!(
                    files.read_f32("c", &[5000]).unwrap(),
                    stored(&c),
                    "{dtype:?}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
