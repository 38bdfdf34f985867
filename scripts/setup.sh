#!/usr/bin/env bash
# Installs the runtime requirements, the two kernel packages and the `vim` model package (all editable).
# Without a GPU the CUDA kernels are not compiled: the scan runs on the fused C++ CPU kernel, everything
# else on PyTorch.
# Where torch is not installed yet and there is no NVIDIA driver (no nvidia-smi), torch and torchvision come
# from torch's CPU-only wheel index (a fraction of the CUDA build's size). VIM_TORCH_INDEX_URL=<url> picks
# another index, VIM_TORCH_INDEX_URL= (empty) the default one.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null; then
  index=${VIM_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
  if [ -n "$index" ] && ! python -m pip install -q --index-url "$index" "torch>=2.6" "torchvision>=0.21"; then
    echo "setup.sh: torch's CPU wheels could not be installed from $index; taking torch from pip's default index" >&2
  fi
fi
python -m pip install -q -r vim_requirements.txt
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  export CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE
fi
python -m pip install -q --no-build-isolation --no-deps -e causal-conv1d -e mamba-1p1p1 -e .
