"""fp32 matmuls of the Mamba projections on a GPU: 3xTF32 (mamba_ssm.ops.mm_3xtf32) against cuBLAS's
IEEE fp32 and TF32, in one run.

--part products: the nine products of in_proj, x_proj and out_proj (forward, input and weight gradients) of a
  Vim-tiny and a Vim-small block at batch 128, 224: max error against float64, relative to max|ref|, and
  the time of one eager call. The eager 3xTF32 op runs its operand split and partial sums as separate
  kernels, so its times include those passes and, where launching is slower than the GPU work, the
  launch overhead (not separated here); under torch.compile (the model part) the split and the sums fuse
  into neighbouring kernels and CUDA graphs remove the launches.
--part model: the compiled fp32 Vim-tiny training step (batch 128) and eager fp32 feature extraction at
  1248 (batch 128) in IEEE and 3xTF32 modes, measured by bench_models.measure.

    python benchmarks/bench_fp32_matmul.py [--part products model] [--json FILE]
"""
import argparse
import json
import platform

import torch
import triton
from triton.testing import do_bench

import bench_models
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops import linear_3xtf32, policy

MODELS = {"tiny": 192, "small": 384}
TOKENS = 128 * 197
MODEL_RUNS = [("ieee", "train", 224, "reduce-overhead"), ("3xtf32", "train", 224, "reduce-overhead"),
              ("3xtf32", "features", 1248, None), ("ieee", "features", 1248, None)]


def products(d_model):
    """(name, a, b) of one block's in_proj, x_proj (one direction) and out_proj products; a and b laid out as
    autograd gives them."""
    block = Mamba(d_model, bimamba_type="v2")  # on the CPU: only its layers' sizes are used
    d_inner, x_dbl = block.d_inner, block.x_proj.out_features
    x, y = torch.randn(TOKENS, d_model, device="cuda"), torch.randn(TOKENS, d_inner, device="cuda")
    u = torch.randn(TOKENS, d_inner, device="cuda")  # the conv output
    w_in = torch.randn(2 * d_inner, d_model, device="cuda") * d_model ** -0.5
    w_x = torch.randn(x_dbl, d_inner, device="cuda") * d_inner ** -0.5
    w_out = torch.randn(d_model, d_inner, device="cuda") * d_inner ** -0.5
    g_in, g_out = torch.randn(TOKENS, 2 * d_inner, device="cuda"), torch.randn(TOKENS, d_model, device="cuda")
    g_x = torch.randn(TOKENS, x_dbl, device="cuda")
    return [("in_proj forward", x, w_in.t()), ("in_proj grad input", g_in, w_in),
            ("in_proj grad weight", g_in.t(), x), ("x_proj forward", u, w_x.t()),
            ("x_proj grad input", g_x, w_x), ("x_proj grad weight", u.t(), g_x), ("out_proj forward", y, w_out.t()),
            ("out_proj grad input", g_out, w_out), ("out_proj grad weight", g_out.t(), y)]


def bench_products():
    rows = []
    for model, d_model in MODELS.items():
        for name, a, b in products(d_model):
            ref = a.double() @ b.double()
            scale = ref.abs().max().item()
            row = {"model": model, "product": name, "M": a.shape[0], "K": a.shape[1], "N": b.shape[1]}
            for mode, fn in (("ieee", lambda: a @ b), ("tf32", lambda: a @ b),
                             ("3xtf32", lambda: linear_3xtf32.kernels.mm(a, b))):
                policy.set_mode(mode)
                row[f"{mode}_err"] = ((fn().double() - ref).abs().max() / scale).item()
                row[f"{mode}_us"] = do_bench(fn, warmup=25, rep=200) * 1e3
            row["3xtf32_tflops"] = 2 * a.shape[0] * a.shape[1] * b.shape[1] / row["3xtf32_us"] / 1e6
            rows.append(row)
            print(f"{model:5s} {name:21s} M={row['M']:6d} K={row['K']:6d} N={row['N']:4d}  "
                  + "  ".join(f"{m} {row[m + '_us']:6.1f} us err {row[m + '_err']:.1e}" for m in ("ieee", "tf32", "3xtf32")),
                  flush=True)
    policy.set_mode("3xtf32")
    return rows


def bench_model():
    rows = []
    for mode, kind, size, compile_mode in MODEL_RUNS:
        policy.set_mode(mode)
        row = bench_models.measure(kind, "vim_tiny_patch16_224", size, 128, "fp32", True, 10, compile_mode)
        rows.append(dict(row, mode=mode, kind=kind, img_size=size))
        print(json.dumps(rows[-1]), flush=True)
    policy.set_mode("3xtf32")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=["products", "model"], default=["products", "model"])
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "triton": triton.__version__, "python": platform.python_version()}
    if "products" in args.part:
        result["products"] = bench_products()
    if "model" in args.part:
        result["model"] = bench_model()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
