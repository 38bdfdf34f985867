"""The training input pipeline end to end on one GPU: does the loader keep up with the model?

Writes an ImageNet-shaped JPEG folder (photo-like content, ~500x375, ~100 KB a file, a few CMYK JPEGs and
PNGs for the CPU fallback; reused when --data already holds it), then measures in one process:
- loader: img/s of the training loader alone, by worker count, for both input paths (cpu: main.py's DeiT
  transforms in the workers; gpu: workers read bytes, the GPU decodes with nvJPEG and augments);
- train: img/s of the trainer's training loop (engine.train_one_epoch with the model, optimizer, weight EMA,
  mixup/cutmix and loss that main.py builds for the pt-vim-t recipe, under --compile) over --steps steps,
  fed by either input path or by one fixed random batch on the GPU ("model only": the same compiled step
  without input cost), for fp32 and bf16 autocast.
The model compiles once per precision (a few minutes in all) and its three runs share it; the first
--warmup steps of each run are not timed. Writes bench_input.json and bench_input.png to --out and prints a
table last.

    python benchmarks/bench_input.py --out $OUT
"""
import argparse
import gc
import json
import multiprocessing
import os
import platform
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main as trainer_main  # noqa: E402
from bench_models import pyplot  # noqa: E402
from datasets import build_dataset  # noqa: E402
from engine import train_one_epoch  # noqa: E402
from mamba_ssm.ops import policy  # noqa: E402
from timm.data import Mixup  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402
from trainer import gpu_input  # noqa: E402

SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (400, 300))  # common ImageNet shapes


def write_photo(task):
    """One photo-like JPEG: smooth colour fields, hard-edged shapes and texture at two scales."""
    path, seed = task
    rng = np.random.default_rng(seed)
    w, h = SIZES[seed % len(SIZES)]
    coarse = rng.uniform(0, 255, (rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(5, 15)):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = [x0, y0, x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    mid = Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    pixels = np.asarray(image, np.float32) * 0.75 + np.asarray(mid, np.float32) * 0.25 + rng.normal(0, 18, (h, w, 1))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if seed % 500 == 1:  # the odd files of a real collection: decoded by the workers on either path
        image.save(path.replace('.JPEG', '.png'))
    else:
        (image.convert('CMYK') if seed % 500 == 2 else image).save(path, quality=90)


def write_image_folder(root, images, classes, val_per_class=2):
    """<root>/train/<class>/*.JPEG (`images` in all) and a small <root>/val; kept when already complete."""
    done = os.path.join(root, 'complete.json')
    spec = {'images': images, 'classes': classes, 'val_per_class': val_per_class}
    if os.path.isfile(done) and json.load(open(done)) == spec:
        return
    tasks = []
    for split, count in (('train', images), ('val', val_per_class * classes)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f'n{c:08d}'), exist_ok=True)
        seed_offset = 10 ** 7 if split == 'val' else 0
        tasks += [(os.path.join(root, split, f'n{i % classes:08d}', f'{split}_{i}.JPEG'), i + seed_offset)
                  for i in range(count)]
    start = time.time()
    with multiprocessing.Pool() as pool:
        pool.map(write_photo, tasks, chunksize=64)
    with open(done, 'w') as f:
        json.dump(spec, f)
    sizes = [os.path.getsize(p) for p, _ in tasks[:500] if os.path.isfile(p)]
    print(f'wrote {len(tasks)} images to {root} in {time.time() - start:.0f} s, mean {np.mean(sizes) / 1e3:.0f} KB',
          flush=True)


def recipe_args(data, batch, dtype, workers, pipeline):
    """main.py's arguments for scripts/pt-vim-t.sh (one GPU) on this folder."""
    argv = ['--model', trainer_main.DEFAULT_MODEL, '--batch-size', str(batch), '--lr', '5e-4', '--weight-decay', '0.1',
            '--drop-path', '0.0', '--compile', '--data-set', 'folder', '--data-path', data,
            '--num-workers', str(workers), '--input-pipeline', pipeline, '--print-freq', '100000',
            '--no-amp' if dtype == 'fp32' else '--if-amp']
    args = trainer_main.get_args_parser().parse_args(argv)
    trainer_main.check_args(args)
    return args


def training_loader(args, device):
    """The loader main.py trains from, for args.input_pipeline."""
    dataset, _ = build_dataset(True, args)
    if args.input_pipeline == 'gpu':
        dataset = gpu_input.encoded_dataset(dataset, args.data_set)
    loader, _, _ = trainer_main.train_loader(dataset, args, args.seed, args.input_pipeline == 'cpu')
    if args.input_pipeline == 'gpu':
        loader = gpu_input.GpuTrainLoader(loader, dataset.augmentation, device)
    return loader


class TimedBatches:
    """The first `steps` batches of `source`, noting when batch `warmup` is handed out."""

    def __init__(self, source, steps, warmup):
        self.source, self.steps, self.warmup, self.started, self.handed_out = source, steps, warmup, None, 0

    def __len__(self):
        return self.steps

    def __iter__(self):
        for step, batch in enumerate(self.source):
            if step == self.warmup:
                torch.cuda.synchronize()
                self.started = time.perf_counter()
            self.handed_out = step + 1
            yield batch
            if step + 1 == self.steps:
                return

    def img_per_s(self, batch):
        torch.cuda.synchronize()
        if self.handed_out < self.steps:
            raise SystemExit(f'error: the loader ran out after {self.handed_out} of {self.steps} batches: '
                             f'raise --images')
        return (self.steps - self.warmup) * batch / (time.perf_counter() - self.started)


def fixed_batches(batch, size, device, num_classes):
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, num_classes, (batch,), device=device)
    while True:
        yield images, targets


def measure_loader(data, batch, workers, pipeline, device, batches, warmup=5):
    args = recipe_args(data, batch, 'fp32', workers, pipeline)
    timed = TimedBatches(training_loader(args, device), batches + warmup, warmup)
    for images, _ in timed:
        images.to(device, non_blocking=True)
    rate = timed.img_per_s(batch)
    del timed
    gc.collect()
    return rate


def measure_training(data, batch, dtype, cpu_workers, gpu_workers, steps, warmup, device):
    """img/s of train_one_epoch fed by a fixed GPU batch, the CPU pipeline and the GPU pipeline."""
    args = recipe_args(data, batch, dtype, cpu_workers, 'cpu')
    trainer_main.seed_everything(args.seed)
    torch.backends.cudnn.benchmark = True
    policy.set_mode(args.fp32_matmul)
    amp_dtype = torch.bfloat16 if dtype == 'bf16' else None
    num_classes = len(os.listdir(os.path.join(data, 'train')))
    # as main() builds them
    model = trainer_main.create_model(args.model, num_classes=num_classes, drop_rate=args.drop,
                                      drop_path_rate=args.drop_path, img_size=args.input_size).to(device)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay)
    compiled = torch.compile(model, mode=args.compile)
    optimizer = trainer_main.build_optimizer(model, args, args.lr * batch / 512)
    lr_scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                          warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                          min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=steps)
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                     switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                     num_classes=num_classes)
    criterion = trainer_main.build_criterion(args, num_classes, device)

    def run(source):
        timed = TimedBatches(source, steps, warmup)
        train_one_epoch(compiled, criterion, timed, optimizer, device, 0, args, lr_scheduler=lr_scheduler,
                        steps_per_epoch=steps, amp_dtype=amp_dtype, model_ema=model_ema, mixup_fn=mixup_fn)
        return timed.img_per_s(batch)

    start = time.time()
    run(fixed_batches(batch, args.input_size, device, num_classes))  # compiles and records the CUDA graphs
    compile_s = time.time() - start
    result = {'compile_and_first_run_s': compile_s,
              'model_only': run(fixed_batches(batch, args.input_size, device, num_classes))}
    for pipeline, workers in (('cpu', cpu_workers), ('gpu', gpu_workers)):
        args.input_pipeline, args.num_workers = pipeline, workers
        loader = training_loader(args, device)
        result[pipeline] = run(loader)
        del loader
        gc.collect()
    print(f'train {dtype}: {result}', flush=True)
    del compiled, model, model_ema, optimizer
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return result


def plot(results, path):
    plt = pyplot()
    if plt is None:
        return
    fig, (ax_loader, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
    for pipeline, rows in results['loader'].items():
        ax_loader.plot([int(w) for w in rows], list(rows.values()), marker='o', label=f'{pipeline} input path')
    ax_loader.set(xlabel='loader workers', ylabel='img/s', title=f'loader alone, batch {results["batch"]}')
    ax_loader.legend()
    labels = ['model_only', 'cpu', 'gpu']
    for i, (dtype, row) in enumerate(results['train'].items()):
        xs = np.arange(len(labels)) + 0.4 * i
        bars = ax_train.bar(xs, [row[k] for k in labels], width=0.38, label=dtype)
        ax_train.bar_label(bars, fmt='%.0f', fontsize=7)
    ax_train.set_xticks(np.arange(len(labels)) + 0.2, ['model only', 'cpu input path', 'gpu input path'])
    ax_train.set(ylabel='img/s', title='training loop (pt-vim-t recipe, --compile)')
    ax_train.legend()
    fig.suptitle(f'{results["gpu"]}, {results["cpu_cores"]} CPU cores, torch {results["torch"]}')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results):
    """The summary printed last: loader img/s, then training img/s per precision and input path."""
    loader = '; '.join(f'{p} path ' + ', '.join(f'{w} workers {r:.0f}' for w, r in rows.items())
                       for p, rows in results['loader'].items())
    lines = [f'{results["gpu"]}, {results["cpu_cores"]} CPU cores, batch {results["batch"]}, torch {results["torch"]}',
             f'loader alone (img/s): {loader}']
    if results['train']:
        lines.append(f'{"Vim-tiny training img/s":24s} {"model only":>10s} {"cpu path":>16s} {"gpu path":>16s}')
        for dtype, row in results['train'].items():
            cells = [f'{row[p]:7.0f} ({100 * row[p] / row["model_only"]:3.0f}%)' for p in ('cpu', 'gpu')]
            lines.append(f'{dtype + " --compile":24s} {row["model_only"]:10.0f} {cells[0]:>16s} {cells[1]:>16s}')
        lines.append(f'(cpu path: {results["cpu_path_workers"]} workers, gpu path: {results["gpu_path_workers"]} '
                     f'workers; % of model only; acceptance: gpu path >= 90%)')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='.', help='folder for bench_input.json and bench_input.png')
    parser.add_argument('--data', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'bench_input_images'),
                        help='where the JPEG folder is written (reused when complete)')
    parser.add_argument('--images', type=int, default=8000,
                        help='training images (an epoch holds 3x as many samples: repeated augmentation)')
    parser.add_argument('--classes', type=int, default=100)
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--steps', type=int, default=150, help='training steps per measured run')
    parser.add_argument('--warmup', type=int, default=20, help='first steps of each run left out of the timing')
    parser.add_argument('--dtypes', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16'])
    parser.add_argument('--loader-batches', type=int, default=20, help='timed batches per loader measurement')
    parser.add_argument('--cpu-workers', type=int, nargs='+', default=None,
                        help='worker counts for the CPU path (default: 4, 8 and main.py\'s default)')
    parser.add_argument('--gpu-workers', type=int, nargs='+', default=[1, 2, 4],
                        help='worker counts for the GPU path; the training run uses the last')
    parser.add_argument('--skip-train', action='store_true', help='only write the images and time the loaders')
    parser.add_argument('--plot-only', metavar='JSON', help='redraw the plot of an earlier run\'s JSON into --out')
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.join(args.out, 'bench_input.png'))
        return
    if not torch.cuda.is_available():
        raise SystemExit('error: this benchmark needs a CUDA GPU')
    device = torch.device('cuda')
    default_workers = trainer_main.default_num_workers()
    cpu_workers = sorted(set(args.cpu_workers or [4, 8, default_workers]))

    write_image_folder(args.data, args.images, args.classes)
    results = {'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'python': platform.python_version(),
               'cpu_cores': len(os.sched_getaffinity(0)), 'model': trainer_main.DEFAULT_MODEL, 'batch': args.batch,
               'images': args.images, 'steps': args.steps, 'warmup': args.warmup, 'loader': {}, 'train': {}}
    for pipeline, counts in (('cpu', cpu_workers), ('gpu', args.gpu_workers)):
        results['loader'][pipeline] = {}
        for workers in counts:
            rate = measure_loader(args.data, args.batch, workers, pipeline, device, args.loader_batches)
            results['loader'][pipeline][str(workers)] = rate
            print(f'loader {pipeline} {workers:2d} workers: {rate:7.0f} img/s', flush=True)
    if not args.skip_train:
        results['cpu_path_workers'], results['gpu_path_workers'] = cpu_workers[-1], args.gpu_workers[-1]
        for dtype in args.dtypes:
            results['train'][dtype] = measure_training(args.data, args.batch, dtype, cpu_workers[-1],
                                                       args.gpu_workers[-1], args.steps, args.warmup, device)
    with open(os.path.join(args.out, 'bench_input.json'), 'w') as f:
        json.dump(results, f, indent=1)
    if results['train']:
        plot(results, os.path.join(args.out, 'bench_input.png'))

    print('\n' + table(results))


if __name__ == '__main__':
    main()
