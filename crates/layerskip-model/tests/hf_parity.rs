//! Numerical parity with Hugging Face `transformers` `LlamaForCausalLM` (float32) on tiny random
//! checkpoints written by `scripts/make_reference.py`: one per variant (GQA + untied head in f32,
//! MHA + tied head in f16, Llama 3 rope scaling + explicit head_dim + GQA 4/1 in bf16).
//!
//! Tolerance: max |ours - reference| <= 1e-4 * max |reference| over each tensor (f32 compute;
//! the weights were rounded to the on-disk dtype before the reference was computed).

use burn::backend::Flex;

mod common;
use common::check_variant;

const TOL: f32 = 1e-4;

#[test]
fn gqa_untied_f32_matches_transformers() {
    check_variant::<Flex>("gqa_untied", &Default::default(), TOL);
}

#[test]
fn mha_tied_f16_matches_transformers() {
    check_variant::<Flex>("mha_tied_f16", &Default::default(), TOL);
}

#[test]
fn llama3_rope_scaling_bf16_matches_transformers() {
    check_variant::<Flex>("llama3_rope_bf16", &Default::default(), TOL);
}
