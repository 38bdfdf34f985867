"""The compiled extensions of mamba_ssm, loaded once. Both are optional: without them every op runs its
PyTorch reference, and an explicit backend request raises with the build command."""
from causal_conv1d.extension import OptionalExtension

# The scan (one direction and the fused bidirectional block), the RMSNorm and the conv + x_proj kernels.
cuda = OptionalExtension(
    "selective_scan_cuda", "selective-scan CUDA kernels",
    "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e mamba-1p1p1 "
    "(needs nvcc and a CUDA build of torch)")
# The fused CPU selective scan.
cpu = OptionalExtension(
    "selective_scan_cpu", "selective-scan CPU kernels",
    "pip install --no-build-isolation -e mamba-1p1p1 (needs a C++ compiler; MAMBA_SKIP_CPU_BUILD unset)")
