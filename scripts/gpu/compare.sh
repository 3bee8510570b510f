#!/usr/bin/env bash
# Two builds in one GPU session, so that before/after figures come from the same card: the
# binary in target/gpu/base (put there by `scripts/gpu/package.sh base` from the earlier commit)
# runs BASE_STEPS, the one in target/gpu runs NEW_STEPS (the full check's steps by default), both
# through scripts/gpu/check.sh on the same random-weight checkpoints. Writes $OUT/base and
# $OUT/new (check.log and gpu_check.json each).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-target/gpu/out}
ckpt=/tmp/layerskip-gpu-ckpt
base_steps=${BASE_STEPS:-ttft_cold make_checkpoints smollm2_f32 smollm2_bf16 llama1b_bf16 sweep_f32}
new_steps=${NEW_STEPS:-ttft_cold ttft_cached ttft_warmed correctness_f32 correctness_bf16 sweep_f32 \
smollm2_f32 smollm2_bf16 llama1b_bf16 default_bf16 launches profile_smollm2 profile_llama1b_bf16 \
hf_default hf_smollm2 hf_llama1b}
if [[ " $new_steps " != *" make_checkpoints "* && ! -d $ckpt/smollm2-135m-shaped ]]; then
    new_steps="make_checkpoints $new_steps"
fi
OUT=$OUT/base GPU_DIR=target/gpu/base CHECK_WORK=/tmp/layerskip-gpu-base CKPT_DIR=$ckpt \
    CHECK_STEPS="$base_steps" CHECK_BUDGET_S=${BASE_BUDGET_S:-200} CHECK_CAP_S=${BASE_CAP_S:-240} \
    bash scripts/gpu/check.sh
OUT=$OUT/new GPU_DIR=target/gpu CHECK_WORK=/tmp/layerskip-gpu-new CKPT_DIR=$ckpt \
    CHECK_STEPS="$new_steps" CHECK_BUDGET_S=${NEW_BUDGET_S:-300} CHECK_CAP_S=${NEW_CAP_S:-360} \
    bash scripts/gpu/check.sh
