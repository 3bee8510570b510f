#!/usr/bin/env bash
# A virtualenv with PyTorch and transformers (from PyPI), for scripts/train_vs_pytorch.py.
# Prints the interpreter to use: python=$(bash scripts/install_torch.sh)
# PyPI's Linux wheel of torch carries the CUDA libraries too (~5 GB); only its CPU side is used.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/torch-venv
if ! "$venv/bin/python" -c "import torch, transformers" 2>/dev/null; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers >&2
fi
echo "$PWD/$venv/bin/python"
