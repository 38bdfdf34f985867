"""Build of the `mamba_ssm` package and its optional CUDA extension `selective_scan_cuda`.

    pip install --no-build-isolation -e causal-conv1d -e mamba-1p1p1

mamba_ssm depends on causal_conv1d (its conv ops, layout helpers and the layout header csrc/seq_layout.h,
which this build reads from the sibling causal-conv1d folder).

Environment switches:
  MAMBA_SKIP_CUDA_BUILD=TRUE   never compile the extension (pure-PyTorch fallback only)
  MAMBA_FORCE_BUILD=TRUE       compile even when no GPU is visible (CI, build machines)
  MAMBA_SKIP_CPU_BUILD=TRUE    do not compile the fused CPU scan `selective_scan_cpu` (built by default
                               wherever a C++ compiler is; without it the CPU runs the PyTorch reference)
  TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"   GPU architectures to compile for, in torch's format; this is
                                       also the default (sm_80 and sm_90, plus PTX of the newest)
  MAX_JOBS                             parallel compile jobs (read by torch's ninja builder)
  NVCC_THREADS                         threads per nvcc call (--threads; default 2)
  MAMBA_PTXAS_VERBOSE=1        print ptxas register/shared-memory reports
The extension is built when nvcc and a CUDA build of torch are present and either a GPU is
visible or FORCE_BUILD is set; otherwise a one-line message says why it was skipped.
Nothing is downloaded.
"""
import os
import sys

from setuptools import find_packages, setup

PREFIX = "MAMBA_"
EXT_NAME = "selective_scan_cuda"
HERE = os.path.dirname(os.path.abspath(__file__))
# One extension module from three kernel folders (the RMSNorm and conv + x_proj ops register into the
# scan's torch library); csrc/common holds the headers they share.
SOURCES = ["csrc/selective_scan/selective_scan.cpp", "csrc/rms_norm/rms_norm_op.cpp", "csrc/rms_norm/add_rms_norm.cu",
           "csrc/conv_x_proj/conv_x_proj_op.cpp", "csrc/conv_x_proj/conv_x_proj.cu"] + [
    f"csrc/selective_scan/ss_{d}_{t}.cu" for d in ("fwd", "bwd") for t in ("fp32", "fp16", "bf16")
]
# The token-major layout rule (seq_layout.h) belongs to the sibling causal_conv1d package, a dependency.
LAYOUT_INCLUDE = os.path.join(HERE, "..", "causal-conv1d", "csrc")
DEFAULT_ARCHS = "8.0;9.0+PTX"
CPU_EXT_NAME = "selective_scan_cpu"
CPU_SOURCES = ["csrc/selective_scan_cpu/selective_scan_cpu.cpp"]


def env_true(name):
    return os.environ.get(PREFIX + name, "FALSE").upper() in ("1", "TRUE", "YES", "ON")


def cuda_extensions():
    """The CUDA extension as a list; empty when the build is skipped (with a one-line reason)."""
    if env_true("SKIP_CUDA_BUILD"):
        print(f"{EXT_NAME}: skipping the CUDA build ({PREFIX}SKIP_CUDA_BUILD is set)")
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError as error:
        print(f"{EXT_NAME}: skipping the CUDA build (torch is not importable: {error})")
        return []
    if torch.version.cuda is None or CUDA_HOME is None:
        print(f"{EXT_NAME}: skipping the CUDA build (needs nvcc and a CUDA build of torch; "
              f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return []
    if not torch.cuda.is_available() and not env_true("FORCE_BUILD"):
        print(f"{EXT_NAME}: skipping the CUDA build (no GPU visible; set {PREFIX}FORCE_BUILD=TRUE to build anyway)")
        return []
    # torch's build turns TORCH_CUDA_ARCH_LIST into the -gencode flags; we only choose the default.
    archs = (os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS).replace(",", ";")  # torch wants ';'
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    # No -std flag: torch picks the C++ standard its headers need (C++17 up to 2.11, C++20 later);
    # a different one can change the layout of c10 types and crash on the first thrown error.
    nvcc_flags = ["-O3", "--threads", os.environ.get("NVCC_THREADS", "2")]
    if env_true("PTXAS_VERBOSE"):
        nvcc_flags.append("--ptxas-options=-v")
    print(f"{EXT_NAME}: building for {archs} (CUDA_HOME={CUDA_HOME})")
    ext = CUDAExtension(
        name=EXT_NAME,
        sources=[os.path.join(HERE, s) for s in SOURCES],
        include_dirs=[LAYOUT_INCLUDE],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [ext]


def cpu_extensions():
    """The fused CPU selective scan `selective_scan_cpu`: built wherever torch and a C++ compiler are."""
    if env_true("SKIP_CPU_BUILD"):
        print(f"{CPU_EXT_NAME}: skipping the CPU build ({PREFIX}SKIP_CPU_BUILD is set)")
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError as error:
        print(f"{CPU_EXT_NAME}: skipping the CPU build (torch is not importable: {error})")
        return []
    # -ffp-contract=fast only fuses multiply-adds (no fast-math); the ISA is chosen at run time. With
    # torch's OpenMP backend at::parallel_for is an OpenMP pragma compiled into this extension: without
    # -fopenmp it runs on one thread (Linux links the libgomp that torch already loaded).
    if sys.platform == "win32":
        flags, link_flags = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":  # Apple's clang has no OpenMP: one thread
        flags, link_flags = ["-O3", "-ffp-contract=fast"], []
    else:
        flags, link_flags = ["-O3", "-ffp-contract=fast", "-fopenmp"], ["-fopenmp"]
    ext = CppExtension(name=CPU_EXT_NAME, sources=[os.path.join(HERE, s) for s in CPU_SOURCES],
                       include_dirs=[LAYOUT_INCLUDE],
                       extra_compile_args={"cxx": flags}, extra_link_args=link_flags)
    return [ext]


ext_modules = cpu_extensions() + cuda_extensions()
cmdclass = {}
if ext_modules:  # torch is importable: the extensions were made by it
    from torch.utils.cpp_extension import BuildExtension

    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    name="mamba_ssm",
    version="1.1.1",
    description="Selective scan (Mamba) with CUDA kernels and a PyTorch fallback, for Vision Mamba",
    packages=find_packages(include=["mamba_ssm", "mamba_ssm.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "causal_conv1d"],
)
