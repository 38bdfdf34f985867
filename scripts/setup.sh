#!/usr/bin/env bash
# Installs the runtime requirements and the two kernel packages (editable). Without a GPU the CUDA
# kernels are not compiled: the scan runs on the fused C++ CPU kernel, everything else on PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r vim_requirements.txt
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  export CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE
fi
python -m pip install -q --no-build-isolation --no-deps -e causal-conv1d -e mamba-1p1p1
