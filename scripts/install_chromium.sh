#!/usr/bin/env bash
# Installs Chromium (Debian's `chromium` package) for the web page's browser test
# (crates/layerskip-cli/tests/browser.rs), which drives it headless over the DevTools Protocol.
# A no-op when it is already there.
set -euo pipefail
if command -v chromium >/dev/null; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || true)"
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "need root or sudo to apt-get install chromium"; exit 1; }
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
