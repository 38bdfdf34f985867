"""Whole-model throughput and peak memory on one GPU: Vim next to DeiT in the same run.

Measures (batch 128 unless --batch): training steps at 224 (forward, backward, the fused AdamW step
main.py uses on CUDA) and feature extraction (forward_features under inference_mode) at several
resolutions, fp32 and bf16 autocast.
DeiT runs twice: with fused (flash / memory-efficient) attention and with plain attention. With --compile,
Vim and DeiT (fused attention) are also measured compiled the same way, so that a compiled Vim is compared
with a compiled baseline.
Writes a JSON file and a PNG plot (img/s and memory against resolution) to --out.

    python benchmarks/bench_models.py --out $OUT
"""
import argparse
import json
import os
import platform

import torch

import timm
import timm.layers
from bench_kernels import copy_bandwidth  # GB/s
import vim  # noqa: F401  (registers the Vim models)

MODELS = {
    "tiny": ("vim_tiny_patch16_224", "deit_tiny_patch16_224"),
    "small": ("vim_small_patch16_224", "deit_small_patch16_224"),
}


def build(name, img_size, fused_attn=True):
    timm.layers.set_fused_attn(fused_attn)
    kwargs = dict(img_size=img_size) if img_size != 224 else {}
    return timm.create_model(name, **kwargs).cuda()


def timed(fn, warmup, iters):
    """Median seconds of fn() over iters runs (CUDA events) after warmup runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return sorted(times)[len(times) // 2]


def make_step(kind, model, images, bf16, compile_mode=None):
    """One training step (forward, cross-entropy, backward, fused AdamW as main.py builds it) or one
    feature extraction (forward_features under inference_mode) of the CUDA model on images, as a function."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    if kind == "train":
        model.train()
        run = torch.compile(model, mode=compile_mode) if compile_mode else model
        labels = torch.randint(0, 1000, (images.shape[0],), device="cuda")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with autocast:
                loss = torch.nn.functional.cross_entropy(run(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()
        features = torch.compile(model.forward_features, mode=compile_mode) if compile_mode else model.forward_features

        def step():
            with torch.inference_mode(), autocast:
                features(images)
    return step


def measure(kind, name, img_size, batch, dtype, fused_attn, iters, compile_mode=None):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(name, img_size, fused_attn)
    images = torch.randn(batch, 3, img_size, img_size, device="cuda")
    step = make_step(kind, model, images, dtype == "bf16", compile_mode)
    try:  # compiled: the first call compiles, the next ones record CUDA graphs (reduce-overhead)
        seconds = timed(step, warmup=4 if compile_mode else 2, iters=iters)
    except torch.OutOfMemoryError:
        return {"oom": True}
    finally:
        del model, step
        if compile_mode:  # dynamo's caches (and CUDA-graph pools) would otherwise keep the model alive
            torch._dynamo.reset()
    return {"img_per_s": batch / seconds, "ms": seconds * 1e3, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def pyplot():
    """matplotlib.pyplot drawing to files, or None (saying so) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(results, path):
    plt = pyplot()
    if plt is None:
        return
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, (label, rows) in enumerate(results["features"].items()):
        style = dict(marker="o", label=label, color=colors[i % len(colors)],
                     linestyle="-" if label.startswith("vim") else "--")
        sizes = [r["img_size"] for r in rows if not r.get("oom")]
        ax_speed.plot(sizes, [r["img_per_s"] for r in rows if not r.get("oom")], **style)
        ax_mem.plot(sizes, [r["peak_gb"] for r in rows if not r.get("oom")], **style)
    ax_speed.set(xlabel="resolution", ylabel="img/s", yscale="log", title="feature extraction, batch %d" % results["batch"])
    ax_mem.set(xlabel="resolution", ylabel="peak GB", yscale="log", title="peak memory")
    ax_speed.legend(fontsize=7)
    fig.suptitle(f"{results['gpu']}, torch {results['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="folder for bench_models.json and bench_models.png")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 738, 1024, 1248])
    parser.add_argument("--sizes-small", type=int, nargs="+", default=[224, 1248],
                        help="feature-extraction resolutions for the small models")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile", metavar="MODE",
                        help="also measure Vim and DeiT under torch.compile(mode=MODE) (training and features at 224)")
    parser.add_argument("--plot-only", metavar="JSON", help="redraw the plot of an earlier run's JSON into --out")
    args = parser.parse_args()
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.join(args.out, os.path.basename(args.plot_only).replace(".json", ".png")))
        return
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")

    results = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "timm": timm.__version__, "python": platform.python_version(), "batch": args.batch,
        "copy_tb_per_s": copy_bandwidth() / 1e3, "train": {}, "features": {},
    }
    lines = []
    for size_name in args.models:
        vim_name, deit_name = MODELS[size_name]
        sizes = args.sizes if size_name == "tiny" else args.sizes_small
        variants = [(vim_name, True), (deit_name, True), (deit_name, False)]
        for dtype in ("fp32", "bf16"):
            first_line = len(lines)
            for name, fused in variants[:2]:
                label = f"{name} {dtype}" + ("" if name.startswith("vim") else " fused-attn")
                row = measure("train", name, 224, args.batch, dtype, fused, args.iters)
                results["train"][label] = row
                lines.append(f"train    224  {label:45s} {row}")
            for name, fused in variants:
                attn = "" if name.startswith("vim") else (" fused-attn" if fused else " plain-attn")
                label = f"{name} {dtype}{attn}"
                rows = []
                for img_size in sizes:
                    row = dict(img_size=img_size, **measure("features", name, img_size, args.batch, dtype, fused,
                                                             args.iters))
                    rows.append(row)
                    lines.append(f"features {img_size:4d} {label:45s} {row}")
                results["features"][label] = rows
            for name, fused in variants[:2] if args.compile else ():
                attn = "" if name.startswith("vim") else " fused-attn"
                label = f"{name} {dtype}{attn} compiled({args.compile})"
                row = measure("train", name, 224, args.batch, dtype, fused, args.iters, args.compile)
                results["train"][label] = row
                lines.append(f"train    224  {label:45s} {row}")
                row = dict(img_size=224, **measure("features", name, 224, args.batch, dtype, fused, args.iters,
                                                   args.compile))
                results["features_compiled"] = {**results.get("features_compiled", {}), label: [row]}
                lines.append(f"features  224 {label:45s} {row}")
            print("\n".join(lines[first_line:]), flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_models.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "bench_models.png"))
    print(f"{results['gpu']}  torch {results['torch']}  CUDA {results['cuda']}  copy {results['copy_tb_per_s']:.2f} TB/s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
