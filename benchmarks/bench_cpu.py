"""Vim on CPU: the fused C++ selective scan (`selective_scan_cpu`) against the PyTorch reference.

Prints three tables and writes JSON (--json):
  1. the selective scan alone at the Vim-tiny@224 shape (batch, 384, 197), N = 16, forward and
     forward+backward, reference vs kernel;
  2. Vim-tiny inference (forward under inference_mode) at 224, img/s, reference vs kernel.
     The scan is switched by patching `mamba_inner.selective_scan_fn` (the one name
     the Mamba inner op calls the scan by), so everything else (conv, projections, flips) is identical in both columns;
  3. Vim-tiny against timm's DeiT-tiny (--baseline), both eval under inference_mode, eager and (with
     --compile) torch.compile'd: the two models run alternately in one process, and the ratio is the
     median of the per-pair ratios, so a disturbance of the machine hits both sides of a pair.

Tables 1-2 report the best of --repeats runs (after a warm-up), table 3 medians of --pairs pairs.
Needs the extension importable (built in place, installed, or --ext-dir).

    PYTHONPATH=causal-conv1d:mamba-1p1p1:. python benchmarks/bench_cpu.py --batch 8 16 --repeats 3
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-repeats", type=int, default=2, help="repeats for the (slow) reference")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--model", default="vim_tiny_patch16_224")
    p.add_argument("--ext-dir", default=None, help="directory holding a built selective_scan_cpu module")
    p.add_argument("--skip-reference", action="store_true", help="time only the kernel")
    p.add_argument("--skip-scan", action="store_true")
    p.add_argument("--skip-reference-model", action="store_true", help="skip table 2")
    p.add_argument("--baseline", default="deit_tiny_patch16_224", help="timm model of table 3 ('' skips it)")
    p.add_argument("--pairs", type=int, default=15, help="alternating (Vim, baseline) runs in table 3")
    p.add_argument("--compile", action="store_true", help="table 3 also with both models torch.compile'd")
    p.add_argument("--cpu-time", action="store_true",
                   help="table 3 on the process's CPU time instead of wall time: steadier on a shared machine "
                        "(with --threads 1, where no thread waits for another)")
    p.add_argument("--json", default=None)
    return p.parse_args()


def best_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_name():
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def paired_times(fns, pairs, clock=time.perf_counter):
    """Seconds per call of each of fns, run alternately `pairs` times after a warm-up: {name: [times]}."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(pairs):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def cell(value, width, spec, suffix=""):
    """A table cell: the value formatted (with suffix), or "-" where it was not measured (--skip-reference)."""
    return (f"{value:{spec}}{suffix}" if value is not None else "-").rjust(width)


def main():
    args = parse()
    if args.ext_dir:
        sys.path.insert(0, args.ext_dir)
    import torch

    import timm
    import vim  # noqa: F401  (registers the Vim models)
    from mamba_ssm.ops import extensions, mamba_inner

    try:
        extensions.cpu.require()
    except RuntimeError as error:
        sys.exit(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    original_fn = mamba_inner.selective_scan_fn

    def with_backend(backend):
        def fn(*a, **k):
            k["backend"] = backend
            return original_fn(*a, **k)
        return fn

    kernel_fn, reference_fn = with_backend("cpu"), with_backend("reference")

    impls = {"kernel": kernel_fn} if args.skip_reference else {"reference": reference_fn, "kernel": kernel_fn}
    info = dict(torch=torch.__version__, python=platform.python_version(), cpu=cpu_name(),
                threads=torch.get_num_threads(), isa=torch.ops.selective_scan_cpu.isa(), dtype="float32",
                note="tables 1-2: best of repeats; table 3: medians of alternating pairs")
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    results = dict(info=info, scan=[], model=[], versus=[])

    # 1. The scan alone.
    if not args.skip_scan:
        print("\nselective scan alone, (batch, 384, 197), N=16, fp32, with D, z, delta_bias, softplus")
        print(f"{'batch':>5} {'pass':>8} {'reference ms':>13} {'kernel ms':>10} {'speedup':>8}")
        torch.manual_seed(0)
        for batch in args.batch:
            d, L, N = 384, 197, 16
            u = torch.randn(batch, d, L)
            delta = torch.randn(batch, d, L) * 0.5
            A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1)
            B, C = torch.randn(batch, 1, N, L), torch.randn(batch, 1, N, L)
            D, z, db = torch.randn(d), torch.randn(batch, d, L), torch.randn(d) * 0.3
            row = dict(batch=batch)
            for pass_name in ("fwd", "fwd+bwd"):
                ms = {}
                for name, fn in impls.items():
                    reps = args.ref_repeats if name == "reference" else args.repeats
                    if pass_name == "fwd":
                        def run(fn=fn):
                            with torch.inference_mode():
                                fn(u, delta, A, B, C, D, z, db, True)
                    else:
                        leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z, db)]

                        def run(fn=fn, leaves=leaves):
                            out = fn(*leaves, delta_softplus=True)
                            out.backward(torch.ones_like(out))
                    ms[name] = best_time(run, reps) * 1e3
                    row[f"{pass_name}_{name}_ms"] = ms[name]
                ref = ms.get("reference")
                print(f"{batch:>5} {pass_name:>8} {cell(ref, 13, '.1f')} {ms['kernel']:>10.2f} "
                      f"{cell(ref and ref / ms['kernel'], 8, '.1f', 'x')}")
            results["scan"].append(row)

    # 2. Whole model, inference.
    model = timm.create_model(args.model).eval()
    if not args.skip_reference_model:
        model_table(args, model, impls, torch, mamba_inner, original_fn, results)

    # 3. Against the baseline model, in the same process.
    if args.baseline:
        versus_table(args, model, timm.create_model(args.baseline).eval(), torch, results)

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


def versus_table(args, model, baseline, torch, results):

    modes = [("eager", model, baseline)]
    if args.compile:
        modes.append(("compiled", torch.compile(model), torch.compile(baseline)))
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"\n{args.model} vs {args.baseline}, inference at 224 (eval, inference_mode), fp32, img/s "
          f"({'CPU' if args.cpu_time else 'wall'} time): medians of {args.pairs} alternating pairs")
    print(f"{'batch':>5} {'mode':>9} {'vim':>8} {'baseline':>9} {'ratio':>6}")
    for batch in args.batch:
        x = torch.randn(batch, 3, 224, 224)
        for mode, vim_model, base_model in modes:
            def run(m):
                def fn():
                    with torch.inference_mode():
                        m(x)
                return fn

            times = paired_times(dict(vim=run(vim_model), baseline=run(base_model)), args.pairs, clock)
            row = dict(batch=batch, mode=mode, baseline=args.baseline, clock="cpu" if args.cpu_time else "wall",
                       vim_img_s=batch / statistics.median(times["vim"]),
                       baseline_img_s=batch / statistics.median(times["baseline"]),
                       ratio=statistics.median(b / v for v, b in zip(times["vim"], times["baseline"])))
            print(f"{batch:>5} {mode:>9} {row['vim_img_s']:>8.2f} {row['baseline_img_s']:>9.2f} {row['ratio']:>5.2f}x")
            results["versus"].append(row)


def model_table(args, model, impls, torch, mamba_inner, original_fn, results):
    print(f"\n{args.model} inference at 224 (forward under inference_mode), fp32, img/s")
    print(f"{'batch':>5} {'reference':>10} {'kernel':>10} {'speedup':>8}")
    for batch in args.batch:
        x = torch.randn(batch, 3, 224, 224)
        row = dict(batch=batch)
        for name, fn in impls.items():
            mamba_inner.selective_scan_fn = fn
            try:
                def run():
                    with torch.inference_mode():
                        model(x)
                reps = args.ref_repeats if name == "reference" else args.repeats
                row[f"{name}_img_s"] = batch / best_time(run, reps)
            finally:
                mamba_inner.selective_scan_fn = original_fn
        ref = row.get("reference_img_s")
        print(f"{batch:>5} {cell(ref, 10, '.2f')} {row['kernel_img_s']:>10.2f} "
              f"{cell(ref and row['kernel_img_s'] / ref, 8, '.1f', 'x')}")
        results["model"].append(row)


if __name__ == "__main__":
    main()
