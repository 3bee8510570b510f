#!/usr/bin/env bash
# A virtualenv with llama.cpp's Python bindings (`llama-cpp-python`, built from source for this
# CPU: about 8 minutes on 2 cores) and `gguf`, for scripts/cpu_vs_llamacpp.py. Prints the
# interpreter to use: python=$(bash scripts/install_llama_cpp.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/llamacpp-venv
if ! "$venv/bin/python" -c "import llama_cpp, gguf" 2>/dev/null; then
    python3 -m venv "$venv" >&2
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install --quiet --disable-pip-version-check \
        --no-cache-dir "llama-cpp-python==0.3.36" "gguf==0.19.0" numpy >&2
fi
echo "$PWD/$venv/bin/python"
