#!/usr/bin/env bash
# Builds what the GPU check needs into target/gpu/ (git-ignored; at most 64 MiB travels to a GPU
# machine): the stripped, gzipped CUDA binary, SmolLM2's tokenizer (for the random checkpoints of
# real shapes written there) and Hugging Face's reference timer. Run here, then on the GPU
# machine: `bash scripts/gpu/check.sh` (see docs/GPU.md). `package.sh base` puts them in
# target/gpu/base instead, for scripts/gpu/compare.sh (build the earlier commit that way first).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=target/gpu${1:+/$1}
mkdir -p "$out"
cargo build --release -p layerskip-cli --features cuda
strip -o "$out/layerskip" target/release/layerskip
gzip -1 -f "$out/layerskip"
bash scripts/prepare_smollm2.sh >/dev/null
cp models/smollm2-135m/tokenizer.json "$out/smollm2-tokenizer.json"
hf_ref=../shared/tools/gpu/hf_ref.py
if [ -f "$hf_ref" ]; then cp "$hf_ref" "$out/hf_ref.py"; fi
du -sh "$out"/*
