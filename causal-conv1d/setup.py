"""Build of the `causal_conv1d` package and its optional CUDA extension `causal_conv1d_cuda`.

    pip install --no-build-isolation -e causal-conv1d

Environment switches:
  CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE   never compile the extension (pure-PyTorch fallback only)
  CAUSAL_CONV1D_FORCE_BUILD=TRUE       compile even when no GPU is visible (CI, build machines)
  TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"   GPU architectures to compile for, in torch's format; this is
                                       also the default (sm_80 and sm_90, plus PTX of the newest)
  MAX_JOBS                             parallel compile jobs (read by torch's ninja builder)
  NVCC_THREADS                         threads per nvcc call (--threads; default 2)
  CAUSAL_CONV1D_PTXAS_VERBOSE=1        print ptxas register/shared-memory reports
The extension is built when nvcc and a CUDA build of torch are present and either a GPU is
visible or FORCE_BUILD is set; otherwise a one-line message says why it was skipped.
Nothing is downloaded.
"""
import os

from setuptools import find_packages, setup

PREFIX = "CAUSAL_CONV1D_"
EXT_NAME = "causal_conv1d_cuda"
HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["csrc/causal_conv1d.cpp", "csrc/conv_fwd.cu", "csrc/conv_bwd.cu"]
DEFAULT_ARCHS = "8.0;9.0+PTX"


def env_true(name):
    return os.environ.get(PREFIX + name, "FALSE").upper() in ("1", "TRUE", "YES", "ON")


def cuda_extensions():
    """Return (ext_modules, cmdclass); empty when the build is skipped (with a one-line reason)."""
    if env_true("SKIP_CUDA_BUILD"):
        print(f"{EXT_NAME}: skipping the CUDA build ({PREFIX}SKIP_CUDA_BUILD is set)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as error:
        print(f"{EXT_NAME}: skipping the CUDA build (torch is not importable: {error})")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print(f"{EXT_NAME}: skipping the CUDA build (needs nvcc and a CUDA build of torch; "
              f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return [], {}
    if not torch.cuda.is_available() and not env_true("FORCE_BUILD"):
        print(f"{EXT_NAME}: skipping the CUDA build (no GPU visible; set {PREFIX}FORCE_BUILD=TRUE to build anyway)")
        return [], {}
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
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="causal_conv1d",
    version="1.1.0",
    description="Causal depthwise conv1d with CUDA kernels and a PyTorch fallback",
    packages=find_packages(include=["causal_conv1d", "causal_conv1d.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
)
