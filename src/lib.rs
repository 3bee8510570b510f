//! Helpers shared by the criterion benches in `benches/`.

use layerskip_model::{LlamaConfig, RopeConfig};

/// The shape of SmolLM2-135M (30 layers, hidden 576, GQA 9/3, vocab 49152, tied head), for
/// benches that use random weights and download nothing.
pub fn smollm2_shaped() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        max_position_embeddings: 8192,
        rms_norm_eps: 1e-5,
        rope: RopeConfig {
            theta: 100_000.0,
            llama3_scaling: None,
        },
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}
