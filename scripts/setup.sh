#!/usr/bin/env bash
# Create .venv and install compressor with its test and Hugging Face extras.
# torch goes first, pinned to the CPU build; everything else is installed under constraints.txt, which pins
# torch again, so no dependency can pull the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,hf]"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
