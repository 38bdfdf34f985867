"""Benchmark of our CUDA kernels (selective scan, causal conv1d) against the PyTorch references,
with a device-to-device copy measured in the same run as the bandwidth ceiling; and of the whole inner
op of a Vim v2 block (both directions' conv, x_proj, dt_proj, scan and their combination, as the
model calls it) against the unfused composition of our single-direction ops (the original's way:
flipped copies) and against the PyTorch reference path.

    python benchmarks/bench_kernels.py [--dtypes float32 bfloat16] [--shapes tiny@224 ...] [--json FILE]

Times are medians of triton.testing.do_bench (CUDA events). The scan's compulsory bytes are one read
of u, delta, z, B, C and one write of out (the backward: those plus dout read and du, ddelta, dz, dB,
dC written); "floor" is those bytes at the measured copy bandwidth.
"""
import argparse
import json
import math
import os
import sys

import torch

SHAPES = [  # (name, batch, d_inner, seqlen): the shapes the original was measured at
    ("tiny@224", 128, 384, 197),
    ("small@224", 64, 768, 197),
    ("base@224", 64, 1536, 197),
    ("tiny-stride8", 128, 384, 785),
    ("tiny@1248", 8, 384, 6085),
]
# The original's numbers, measured on an H200 in fp32 (benchmarks/results/README.md): scan fwd, scan fwd+bwd, conv fwd+bwd (ms).
ORIGINAL_H200 = {
    "tiny@224": (0.405, 1.60, 0.32), "small@224": (0.403, 1.59, 0.35), "base@224": (0.800, 3.04, 0.48),
    "tiny-stride8": (1.45, 5.70, 0.45), "tiny@1248": (0.69, 2.74, 0.32),
}
# The original's whole inner op of one direction, fwd and fwd+bwd (ms; H200, fp32).
ORIGINAL_INNER_H200 = {
    "tiny@224": (0.79, 2.60), "small@224": (0.73, 2.57), "base@224": (1.21, 4.58),
    "tiny-stride8": (2.02, 7.75), "tiny@1248": (1.02, 3.96),
}
DSTATE = 16


def bench(fn, rep=200):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def graph_bench(fn):
    """Median time of fn replayed from a CUDA graph: the GPU time without Python/launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = bench(graph.replay)
    del graph
    return ms


def copy_bandwidth():
    n = 1 << 28  # 1 GiB of fp32
    a = torch.empty(n, device="cuda")
    a.uniform_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9  # GB/s, read + write


def scan_parameters(dim, device="cuda"):
    """A, D, delta_bias of one direction as Vim initialises them: A = -(1..N), D = 1, and delta_bias =
    softplus^-1(dt) with dt log-uniform in [1e-3, 1e-1]."""
    A = -torch.arange(1, DSTATE + 1, device=device, dtype=torch.float32).repeat(dim, 1)
    dt = torch.exp(torch.rand(dim, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return A, torch.ones(dim, device=device), dt + torch.log(-torch.expm1(-dt))


def scan_inputs(batch, dim, seqlen, dtype):
    """Leaves (requiring grad) u, delta, A, B, C, D, z, delta_bias of one Vim-like scan."""
    dev = "cuda"
    u = torch.randn(batch, dim, seqlen, device=dev, dtype=dtype)
    delta = (0.5 * torch.randn(batch, dim, seqlen, device=dev)).to(dtype)
    A, D, bias = scan_parameters(dim, dev)
    B = torch.randn(batch, 1, DSTATE, seqlen, device=dev, dtype=dtype)
    C = torch.randn(batch, 1, DSTATE, seqlen, device=dev, dtype=dtype)
    z = torch.randn(batch, dim, seqlen, device=dev, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


def inner_op_row(name, batch, dim, seqlen, dtype, with_reference):
    """Times of the bidirectional inner op on the input the model gives it: xz = in_proj(x), transposed."""
    from mamba_ssm.modules.mamba_simple import Mamba
    from mamba_ssm.ops.mamba_inner import bimamba_inner_fn_no_out_proj, mamba_inner_fn_no_out_proj

    mixer = Mamba(dim // 2, bimamba_type="v2").cuda()
    leaves = [p for n, p in mixer.named_parameters() if not n.startswith(("in_proj", "out_proj"))]
    xz = torch.randn(batch, seqlen, 2 * dim, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    dout = torch.randn(batch, seqlen, dim, device="cuda", dtype=dtype).transpose(1, 2)

    def autocast():  # 16-bit inputs meet the fp32 parameters under autocast, as in the model
        return torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)

    def fused(backend="auto"):
        with autocast():
            return bimamba_inner_fn_no_out_proj(xz, mixer._direction_params(""), mixer._direction_params("_b"),
                                                backend=backend)

    def unfused():  # two single-direction inner ops, the reverse one on flipped copies
        f, b = mixer._direction_params(""), mixer._direction_params("_b")
        with autocast():
            return mamba_inner_fn_no_out_proj(xz, **f) + mamba_inner_fn_no_out_proj(xz.flip(-1), **b).flip(-1)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(), [xz, *leaves], dout)

    es = torch.finfo(dtype).bits // 8
    row = {"shape": name, "batch": batch, "dim": dim, "seqlen": seqlen, "dtype": str(dtype).split(".")[-1]}
    for label, fn in (("fused", fused), ("unfused", unfused)):
        with torch.no_grad():
            row[f"{label}_fwd_ms"] = bench(fn)
        row[f"{label}_fwdbwd_ms"] = bench(fwd_bwd(fn))
    # The same ops replayed from a CUDA graph (as under `main.py --compile`): GPU time only.
    with torch.no_grad():
        row["fused_fwd_gpu_ms"] = graph_bench(fused)
    row["fused_fwdbwd_gpu_ms"] = graph_bench(fwd_bwd(fused))
    if with_reference:
        with torch.no_grad():
            row["reference_fwd_ms"] = bench(lambda: fused("reference"), rep=20)
        row["reference_fwdbwd_ms"] = bench(fwd_bwd(lambda: fused("reference")), rep=20)
    # Compulsory bytes: xz read and the output written (forward); dout read and dxz written (backward).
    fwd_bytes = 3 * batch * dim * seqlen * es
    row["fused_fwd_GBps"] = fwd_bytes / (row["fused_fwd_ms"] * 1e-3) / 1e9
    row["fused_fwdbwd_GBps"] = 2 * fwd_bytes / (row["fused_fwdbwd_ms"] * 1e-3) / 1e9
    if dtype == torch.float32:
        row["original_two_inner_ops_h200_ms"] = [2 * t for t in ORIGINAL_INNER_H200[name]]
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"))
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES], choices=[s[0] for s in SHAPES])
    parser.add_argument("--reference-shapes", nargs="*", default=["tiny@224"],
                        help="shapes on which the (slow, Python-loop) PyTorch references are timed")
    args = parser.parse_args()

    from causal_conv1d import cuda_ops as conv_ops
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref
    from mamba_ssm.ops import extensions, mamba_inner, scan
    from mamba_ssm.ops.scan import selective_scan_ref

    extensions.cuda.require()
    conv_ops.require()
    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "cuda": torch.version.cuda}
    bw = copy_bandwidth()
    info["copy_GBps"] = bw
    print(f"# {info['gpu']} ({info['sms']} SMs), torch {info['torch']}, CUDA {info['cuda']}; "
          f"device-to-device copy {bw:.0f} GB/s (read + write)")
    rows, inner_rows = [], []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        es = torch.finfo(dtype).bits // 8
        for name, batch, dim, seqlen in [s for s in SHAPES if s[0] in args.shapes]:
            row = {"shape": name, "batch": batch, "dim": dim, "seqlen": seqlen, "dtype": dtype_name}
            elems = batch * dim * seqlen
            bc = 2 * batch * DSTATE * seqlen
            fwd_bytes = (4 * elems + bc) * es
            bwd_bytes = (4 * elems + bc) * es + (4 * elems + bc) * es + 3 * elems * es + bc * es
            # Scan forward (inference: no checkpoints) and forward+backward.
            ins_g = scan_inputs(batch, dim, seqlen, dtype)
            ins = [t.detach() for t in ins_g]
            with torch.no_grad():
                row["scan_fwd_ms"] = bench(lambda: scan.cuda_selective_scan(*ins, True, False))
            dout = torch.randn(batch, dim, seqlen, device="cuda", dtype=dtype)

            def fwd_bwd():
                out = scan.cuda_selective_scan(*ins_g, True, False)
                torch.autograd.grad(out, ins_g, dout)

            row["scan_fwdbwd_ms"] = bench(fwd_bwd)
            row["scan_fwd_GBps"] = fwd_bytes / (row["scan_fwd_ms"] * 1e-3) / 1e9
            row["scan_fwd_floor_ms"] = fwd_bytes / (bw * 1e9) * 1e3
            row["scan_fwdbwd_floor_ms"] = (fwd_bytes + bwd_bytes) / (bw * 1e9) * 1e3
            # Causal conv1d fwd+bwd (width 4, bias, SiLU).
            x = torch.randn(batch, dim, seqlen, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(dim, 4, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(dim, device="cuda", dtype=dtype, requires_grad=True)
            with torch.no_grad():
                row["conv_fwd_ms"] = bench(lambda: conv_ops.causal_conv1d(x, w, b, True))

            def conv_fb():
                out = conv_ops.causal_conv1d(x, w, b, True)
                torch.autograd.grad(out, (x, w, b), dout)

            row["conv_fwdbwd_ms"] = bench(conv_fb)
            # GPU-only times (CUDA graph replay of the raw ops; no Python / autograd overhead).
            ops = torch.ops.selective_scan_cuda
            with torch.no_grad():
                row["gpu_scan_fwd_ms"] = graph_bench(lambda: ops.fwd(*ins, True, False, False, False))
                ckpt = ops.fwd(*ins, True, False, True, False)[2]
                row["gpu_scan_bwd_ms"] = graph_bench(lambda: ops.bwd(*ins, dout, None, ckpt, True, False))
                cops = torch.ops.causal_conv1d_cuda
                row["gpu_conv_fwd_ms"] = graph_bench(lambda: cops.fwd(x.detach(), w.detach(), b.detach(), True, False))
                row["gpu_conv_bwd_ms"] = graph_bench(
                    lambda: cops.bwd(x.detach(), w.detach(), b.detach(), dout, True, False))
                # The token-major layout the model uses (channel stride 1).
                x_tm = torch.randn(batch, seqlen, dim, device="cuda", dtype=dtype).transpose(1, 2)
                dout_tm = torch.randn(batch, seqlen, dim, device="cuda", dtype=dtype).transpose(1, 2)
                row["gpu_conv_tm_fwd_ms"] = graph_bench(lambda: cops.fwd(x_tm, w.detach(), b.detach(), True, False))
                row["gpu_conv_tm_bwd_ms"] = graph_bench(
                    lambda: cops.bwd(x_tm, w.detach(), b.detach(), dout_tm, True, False))
                del x_tm, dout_tm
            # Both directions of a Vim v2 block: fused op vs the original's way (flipped copies,
            # two scans, flip back, add).
            ins_b = scan_inputs(batch, dim, seqlen, dtype)
            fb = [ins_g[i] for i in (0, 1, 2, 3, 4, 5, 7)] + [ins_b[i] for i in (0, 1, 2, 3, 4, 5, 7)] + [ins_g[6]]

            def unfused():
                u, delta, A, B, C, D, z, bias = ins_g
                ub, db_, Ab, Bb, Cb, Db, _, biasb = ins_b
                y_f = scan.cuda_selective_scan(u, delta, A, B, C, D, z, bias, True, False)
                y_b = scan.cuda_selective_scan(ub.flip(-1), db_.flip(-1), Ab, Bb.flip(-1), Cb.flip(-1), Db,
                                              z.flip(-1), biasb, True, False)
                return y_f + y_b.flip(-1)

            with torch.no_grad():
                row["bi_fused_fwd_ms"] = bench(lambda: mamba_inner.fused_bimamba_scan(*fb, True))
                row["bi_unfused_fwd_ms"] = bench(unfused)
                rawb = [t.detach() for t in fb]
                no_fusions = (None,) * 6  # delta computed outside, convs applied outside
                row["gpu_bi_fwd_ms"] = graph_bench(lambda: ops.bi_fwd(*rawb, *no_fusions, True, False))
                _, ysum, ckf, ckb = ops.bi_fwd(*rawb, *no_fusions, True, True)
                row["gpu_bi_bwd_ms"] = graph_bench(lambda: ops.bi_bwd(*rawb, dout, ysum, ckf, ckb, True))
            row["bi_fused_fwdbwd_ms"] = bench(lambda: torch.autograd.grad(mamba_inner.fused_bimamba_scan(*fb, True), fb, dout))
            row["bi_unfused_fwdbwd_ms"] = bench(lambda: torch.autograd.grad(unfused(), fb, dout))
            bi_bytes = (7 * elems + 4 * bc) * es  # u, delta of both + z in, out; B, C of both
            row["gpu_bi_fwd_GBps"] = bi_bytes / (row["gpu_bi_fwd_ms"] * 1e-3) / 1e9
            row["gpu_bi_fwd_floor_ms"] = bi_bytes / (bw * 1e9) * 1e3
            del ins_b, fb
            if name in args.reference_shapes:
                with torch.no_grad():
                    row["ref_scan_fwd_ms"] = bench(lambda: selective_scan_ref(*ins, True, False), rep=50)

                def ref_fb():
                    out = selective_scan_ref(*ins_g, True, False)
                    torch.autograd.grad(out, ins_g, dout)

                row["ref_scan_fwdbwd_ms"] = bench(ref_fb, rep=50)

                def ref_conv_fb():
                    out = causal_conv1d_ref(x, w, b, "silu")
                    torch.autograd.grad(out, (x, w, b), dout)

                row["ref_conv_fwdbwd_ms"] = bench(ref_conv_fb, rep=50)
            if dtype == torch.float32:
                row["original_h200_ms"] = dict(zip(("scan_fwd", "scan_fwdbwd", "conv_fwdbwd"), ORIGINAL_H200[name]))
            rows.append(row)
            del ins, ins_g, x, w, b, dout, ckpt
            torch.cuda.empty_cache()
            inner_rows.append(inner_op_row(name, batch, dim, seqlen, dtype, name in args.reference_shapes))
            torch.cuda.empty_cache()

    print("Eager (what a PyTorch caller sees, incl. Python/autograd overhead); ms, medians:")
    print(f"{'shape':13s} {'dtype':9s} {'scan fwd':>8s} {'f+b':>7s} {'conv f+b':>8s} {'bi fused':>8s} {'f+b':>7s} "
          f"{'bi unfused':>10s} {'f+b':>7s} {'ref fwd':>8s} {'ref f+b':>8s} {'ref conv':>8s} {'orig(H200) fwd/f+b/conv':>24s}")
    for r in rows:
        o = r.get("original_h200_ms")
        ostr = f"{o['scan_fwd']:.3f}/{o['scan_fwdbwd']:.2f}/{o['conv_fwdbwd']:.2f}" if o else "-"
        ref = lambda k: f"{r[k]:8.2f}" if k in r else f"{'-':>8s}"  # noqa: E731
        print(f"{r['shape']:13s} {r['dtype']:9s} {r['scan_fwd_ms']:8.3f} {r['scan_fwdbwd_ms']:7.3f} "
              f"{r['conv_fwdbwd_ms']:8.3f} {r['bi_fused_fwd_ms']:8.3f} {r['bi_fused_fwdbwd_ms']:7.3f} "
              f"{r['bi_unfused_fwd_ms']:10.3f} {r['bi_unfused_fwdbwd_ms']:7.3f} {ref('ref_scan_fwd_ms')} "
              f"{ref('ref_scan_fwdbwd_ms')} {ref('ref_conv_fwdbwd_ms')} {ostr:>24s}")
    print("GPU only (CUDA-graph replay of the raw ops); ms, medians; floor = compulsory bytes at the copy bandwidth:")
    print(f"{'shape':13s} {'dtype':9s} {'scan fwd':>8s} {'GB/s':>5s} {'floor':>6s} {'scan bwd':>8s} {'conv fwd':>8s} "
          f"{'conv bwd':>8s} {'tm fwd':>7s} {'tm bwd':>7s} {'bi fwd':>7s} {'GB/s':>5s} {'floor':>6s} {'bi bwd':>7s}")
    for r in rows:
        gbs = r["scan_fwd_GBps"] * r["scan_fwd_ms"] / r["gpu_scan_fwd_ms"]
        print(f"{r['shape']:13s} {r['dtype']:9s} {r['gpu_scan_fwd_ms']:8.3f} {gbs:5.0f} {r['scan_fwd_floor_ms']:6.3f} "
              f"{r['gpu_scan_bwd_ms']:8.3f} {r['gpu_conv_fwd_ms']:8.3f} {r['gpu_conv_bwd_ms']:8.3f} "
              f"{r['gpu_conv_tm_fwd_ms']:7.3f} {r['gpu_conv_tm_bwd_ms']:7.3f} "
              f"{r['gpu_bi_fwd_ms']:7.3f} {r['gpu_bi_fwd_GBps']:5.0f} {r['gpu_bi_fwd_floor_ms']:6.3f} {r['gpu_bi_bwd_ms']:7.3f}")
    print("Whole bidirectional inner op (eager, as the model calls it; ms, medians); GB/s of its compulsory bytes "
          "(xz in, output out; twice that for fwd+bwd) and their share of the copy bandwidth:")
    print(f"{'shape':13s} {'dtype':9s} {'fused fwd':>9s} {'f+b':>7s} {'GB/s':>11s} {'of copy':>9s} {'unfused fwd':>11s} "
          f"{'f+b':>7s} {'ref fwd':>8s} {'ref f+b':>8s} {'orig 2x(fwd/f+b)':>17s} {'graph fwd/f+b':>14s}")
    for r in inner_rows:
        o = r.get("original_two_inner_ops_h200_ms")
        ref = lambda k: f"{r[k]:8.2f}" if k in r else f"{'-':>8s}"  # noqa: E731
        print(f"{r['shape']:13s} {r['dtype']:9s} {r['fused_fwd_ms']:9.3f} {r['fused_fwdbwd_ms']:7.3f} "
              f"{r['fused_fwd_GBps']:5.0f}/{r['fused_fwdbwd_GBps']:<5.0f} "
              f"{r['fused_fwd_GBps'] / bw:4.0%}/{r['fused_fwdbwd_GBps'] / bw:<4.0%} "
              f"{r['unfused_fwd_ms']:11.3f} {r['unfused_fwdbwd_ms']:7.3f} {ref('reference_fwd_ms')} "
              f"{ref('reference_fwdbwd_ms')} {(f'{o[0]:.2f}/{o[1]:.2f}' if o else '-'):>17s} "
              f"{r['fused_fwd_gpu_ms']:6.3f}/{r['fused_fwdbwd_gpu_ms']:<6.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"info": info, "rows": rows, "inner_op_rows": inner_rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
