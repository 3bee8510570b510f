#!/usr/bin/env bash
# A virtualenv with the official `openai` Python client (from PyPI), for the server's test.
# Prints the interpreter to use: LAYERSKIP_OPENAI_PYTHON=$(bash scripts/install_openai_client.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/openai-venv
if ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40" >&2
fi
echo "$PWD/$venv/bin/python"
