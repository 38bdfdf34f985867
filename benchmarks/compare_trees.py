"""Vim end to end, two (or more) source trees side by side in one run: feature extraction at 1248 (eager,
fp32 and bf16 autocast) and the compiled training step at 224, measured by bench_models.measure.

Each tree is a folder holding causal-conv1d/, mamba-1p1p1/ (extensions built in place) and vim/, e.g. an
older commit: `git archive REV causal-conv1d mamba-1p1p1 vim | tar -x -C DIR`, then
`bash scripts/build_inplace.sh LOG DIR/causal-conv1d DIR/mamba-1p1p1`. Every measurement runs in a fresh
process with that tree first on PYTHONPATH; the rounds go features, train, features, trees alternating,
so that drift of the GPU's clocks shows up as a difference between the two feature rounds.

    python benchmarks/compare_trees.py base=/tmp/base new=. [--model vim_tiny_patch16_224] [--out FILE]
        [--kinds features]   (only the feature rounds: no compilation)   [--dtypes fp32]   [--repeat N]
"""
import argparse
import json
import os
import subprocess
import sys

ROUNDS = [("features", 1248, None), ("train", 224, "reduce-overhead"), ("features", 1248, None)]


def worker(spec):
    import torch
    from bench_models import measure

    tree, kind, size, compile_mode, model, dtype, batch, iters = spec
    for module in map(__import__, ("causal_conv1d_cuda", "selective_scan_cuda")):
        if not os.path.abspath(module.__file__).startswith(tree + os.sep):
            raise SystemExit(f"error: {module.__name__} of tree {tree} loads from {module.__file__}: build it in place")
    row = measure(kind, model, size, batch, dtype, True, iters, compile_mode)
    print(json.dumps(dict(row, gpu=torch.cuda.get_device_name())))


def measure_in(tree, spec):
    tree = os.path.abspath(tree)
    missing = [d for d in ("causal-conv1d", "mamba-1p1p1", "vim") if not os.path.isdir(os.path.join(tree, d))]
    if missing:
        raise SystemExit(f"error: tree {tree} lacks {', '.join(missing)} (see this script's docstring)")
    path = os.pathsep.join([os.path.join(tree, "causal-conv1d"), os.path.join(tree, "mamba-1p1p1"), tree])
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps([tree, *spec])],
                          env=dict(os.environ, PYTHONPATH=path), text=True, stdout=subprocess.PIPE, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", metavar="NAME=DIR")
    parser.add_argument("--model", default="vim_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", help="also write the lines to this file")
    parser.add_argument("--kinds", nargs="+", choices=["features", "train"], default=["features", "train"],
                        help="which rounds to run")
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--repeat", type=int, default=1, help="run the rounds this many times")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if len(args.trees) < 2 or any("=" not in t for t in args.trees):
        raise SystemExit("error: give at least two trees as NAME=DIR, e.g. base=/tmp/base new=.")
    trees = [t.split("=", 1) for t in args.trees]
    with open(args.out or os.devnull, "w") as out:  # written line by line: a run cut short keeps its rows
        for kind, size, compile_mode in [r for r in ROUNDS if r[0] in args.kinds] * args.repeat:
            for dtype in args.dtypes:
                for name, tree in trees:
                    row = measure_in(tree, [kind, size, compile_mode, args.model, dtype, args.batch, args.iters])
                    if out.tell() == 0:
                        out.write(f"# {row['gpu']}, {args.model}, batch {args.batch}, median of {args.iters}; "
                                  f"features eager, train compiled ({ROUNDS[1][2]})\n")
                    line = f"{name:6s} {kind:8s} {size:4d} {dtype} " + (
                        "out of memory" if row.get("oom") else
                        f"img/s {row['img_per_s']:8.1f} ms {row['ms']:7.2f} peak_gb {row['peak_gb']:6.2f}")
                    print(line, flush=True)
                    out.write(line + "\n")
                    out.flush()


if __name__ == "__main__":
    main()
