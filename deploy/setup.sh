#!/usr/bin/env bash
# Set up a local C-LoRA checkout: a virtual environment in .venv with the
# project and its test tools. Idempotent. On a machine without CUDA the CPU
# build of torch is installed first (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/pip install -q torch
    else
        .venv/bin/pip install -q torch==2.13.0 \
            || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
.venv/bin/pip install -q -e '.[dev]'
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
