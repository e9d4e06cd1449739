#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for the browser test of thoughts_page.py
# (tests/test_thoughts_page.py). Does nothing if a chromium binary is already on PATH.
set -euo pipefail

for bin in chromium chromium-browser; do
    if command -v "$bin" >/dev/null 2>&1; then
        echo "install_chromium: $bin already installed: $("$bin" --version 2>/dev/null || echo '?')"
        exit 0
    fi
done

# Root runs apt-get directly; anyone else goes through sudo, if there is one.
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install_chromium: not root and no sudo; install the 'chromium' package by hand" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_chromium: apt-get update"
"${SUDO[@]}" apt-get update -qq
echo "install_chromium: apt-get install chromium"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "install_chromium: installed $(chromium --version 2>/dev/null || echo chromium)"
