"""Train, fine-tune and evaluate Vision Mamba (and other timm classifiers) the DeiT way.

Exit codes: 0 done, 1 another process of a distributed job stopped answering (--dist-timeout), 2 user
error (one line on stderr), 3 training diverged (non-finite steps), 75 stopped by SIGTERM, SIGUSR1 or
Ctrl-C after saving a resumable checkpoint, or before anything needed saving (rerun the same command),
130 a second Ctrl-C before that save.

Resuming (an existing OUTPUT_DIR/checkpoint.pth, else --resume) restores the weights, EMA, optimizer
moments, loss scale, random states, epoch and step, and best accuracy. Everything else comes from the
command line, hyperparameters included (--lr, --min-lr, --warmup-lr, --warmup-epochs, --sched, --epochs,
--weight-decay, --clip-grad, --batch-size, --num-workers, ...): the learning-rate schedule is rebuilt from
them and continues at the resumed step, so a new --lr or --epochs takes effect at once. The optimizer
itself (--opt) and the model must be those of the checkpoint.
"""
import argparse
import ast
import copy
import datetime
import difflib
import json
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import timm
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from mamba_ssm.ops import linear_3xtf32, policy

try:
    from timm.optim import param_groups_weight_decay
except ImportError:  # timm before 1.0.12 keeps it in optim_factory only
    from timm.optim.optim_factory import param_groups_weight_decay

import vim  # noqa: F401  (registers the Vim models with timm)
from datasets import DATA_SETS, TIMM_PREFIXES, build_dataset, check_class_sets, data_set_name, verify_images
from engine import TrainingDiverged, evaluate, train_one_epoch
from trainer import UserError, gpu_input
from trainer.checkpoint import (capture_rng_state, check_compatible, load_finetune_weights, model_state_dict,
                                open_checkpoint, restore_rng_state, save_atomic)
from trainer.distributed import (collective_timeout, get_rank, get_world_size, init_distributed_mode,
                                 is_dist_avail_and_initialized, is_main_process, log, main_process_check)
from trainer.image_files import BadImageCount, CountingLoader
from trainer.losses import DistillationLoss
from trainer.output_dir import OutputDirLock, check_writable, write_atomic
from trainer.preemption import PREEMPTED_EXIT_CODE, Preempted, StopRequest, shield_loader_worker, stop_at_once
from trainer.samplers import ResumableSampler, SeededDataset

DEFAULT_MODEL = 'vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2'


def model_kwargs(text):
    """Parse `key=value` (value a Python literal, else a string), e.g. `depth=2`."""
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(f'expected key=value, got {text!r}')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def spellings(flag):
    """A long flag in its hyphen form (shown in --help) and its underscore form (the original's scripts)."""
    name = flag[2:]
    return list(dict.fromkeys([f'--{name.replace("_", "-")}', f'--{name.replace("-", "_")}']))


def add_flag(group, *flags, **kwargs):
    """add_argument with every flag accepted in both spellings: --num-workers and --num_workers."""
    return group.add_argument(*[s for flag in flags for s in spellings(flag)], **kwargs)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Lists each flag in one spelling; shows a default only where it informs: not for switches, unset
    values, or help that says it."""

    def _get_help_string(self, action):
        if action.default in (None, False, True, []) or 'default' in action.help:
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action):
        shown = copy.copy(action)
        shown.option_strings = [s for s in action.option_strings if spellings(s)[0] == s]
        return super()._format_action_invocation(shown)


class ArgumentParser(argparse.ArgumentParser):
    """Errors in one line; an unknown flag is answered with the closest existing one."""

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flag = next((a.split('=', 1)[0] for a in unknown if a.startswith('--')), None)
            if flag is None:
                self.error(f'unrecognized arguments: {" ".join(unknown)}')
            known = [a.option_strings[0] for a in self._actions if a.option_strings]
            close = difflib.get_close_matches(spellings(flag)[0], known, n=1)
            self.error(f'unknown flag {flag}' + (f': did you mean {close[0]}?' if close else ''))
        return namespace

    def error(self, message):
        message = re.sub(r'/--[a-z0-9]+(_[a-z0-9]+)+', '', message)  # argparse names a flag by all its spellings
        self.exit(2, f'{self.prog}: error: {message} (all flags: {self.prog} --help)\n')


def get_args_parser():
    p = ArgumentParser(prog='main.py', description='Vision Mamba training and evaluation. Every flag is also '
                       'accepted with underscores (--num_workers for --num-workers).',
                       formatter_class=HelpFormatter, epilog=__doc__)
    add_flag(p, '--batch-size', default=64, type=int,
             help='images per process and step (global batch = this x processes)')
    add_flag(p, '--eval-batch-size', default=None, type=int,
             help='images per process in evaluation (default: 2 x --batch-size)')
    add_flag(p, '--epochs', default=300, type=int, help='number of training epochs')

    g = p.add_argument_group('model')
    add_flag(g, '--model', default=DEFAULT_MODEL, type=str,
             help='timm model name (the Vim names and their short aliases are registered by `import vim`)')
    add_flag(g, '--model-kwargs', nargs='*', default=[], type=model_kwargs, metavar='KEY=VALUE',
             help='extra model constructor arguments, e.g. depth=2 embed_dim=64')
    add_flag(g, '--input-size', default=224, type=int, help='image side in pixels')
    add_flag(g, '--drop', type=float, default=0.0, help='dropout rate')
    add_flag(g, '--drop-path', type=float, default=0.1, help='stochastic depth rate')
    add_flag(g, '--compile', nargs='?', const='reduce-overhead', default=None, metavar='MODE',
             choices=['default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs', 'none'],
             help='train through torch.compile(mode=MODE) (without MODE: reduce-overhead, which replays '
                  'CUDA graphs); compiling takes a minute or two at start. The recipes in scripts/ turn it '
                  'on; --compile none turns it off again')
    add_flag(g, '--grad-checkpointing', action='store_true',
             help='recompute activations in the backward pass to save memory')
    add_flag(g, '--model-ema', action='store_true',
             help='keep an exponential moving average (EMA) of the weights (default)')
    add_flag(g, '--no-model-ema', action='store_false', dest='model_ema', help='no weight EMA')
    p.set_defaults(model_ema=True)
    add_flag(g, '--model-ema-decay', type=float, default=0.99996, help='EMA decay per step')
    add_flag(g, '--model-ema-force-cpu', action='store_true', help='keep the EMA weights on the CPU')

    g = p.add_argument_group('optimizer')
    add_flag(g, '--opt', default='adamw', type=str, help='optimizer name (timm create_optimizer_v2)')
    add_flag(g, '--opt-eps', default=1e-8, type=float, help='optimizer epsilon')
    add_flag(g, '--opt-betas', default=None, type=float, nargs='+',
             help='optimizer betas (default: the optimizer\'s)')
    add_flag(g, '--clip-grad', type=float, default=None,
             help='clip the gradient norm to this value (off when unset)')
    add_flag(g, '--momentum', type=float, default=0.9, help='SGD momentum')
    add_flag(g, '--weight-decay', type=float, default=0.05,
             help='weight decay (not applied to biases, 1-D parameters, pos_embed, cls_token)')
    add_flag(g, '--ssm-no-weight-decay', action='store_true',
             help='also exempt the SSM parameters A_log, A_b_log, D, D_b from weight decay (the original recipe'
                  ' decayed the 2-D A_log/A_b_log)')

    g = p.add_argument_group('learning-rate schedule (stepped every iteration)')
    add_flag(g, '--sched', default='cosine', type=str,
             help='schedule (timm create_scheduler_v2): cosine, step, tanh, poly, ...')
    add_flag(g, '--lr', type=float, default=5e-4,
             help='learning rate for a global batch of 512; scaled by global batch / 512 unless --unscale-lr')
    add_flag(g, '--unscale-lr', action='store_true', help='use --lr as given, without linear scaling')
    add_flag(g, '--warmup-lr', type=float, default=1e-6, help='learning rate at the start of warm-up')
    add_flag(g, '--min-lr', type=float, default=1e-5, help='lower bound of the cosine schedule')
    add_flag(g, '--warmup-epochs', type=int, default=5, help='epochs of linear warm-up')
    add_flag(g, '--cooldown-epochs', type=int, default=10,
             help='epochs at --min-lr after the schedule (passed to timm; as in DeiT, training stops after '
                  '--epochs, so these only run if --epochs exceeds the schedule)')
    add_flag(g, '--decay-epochs', type=float, default=30, help='epochs between decays of the step schedule')
    add_flag(g, '--decay-rate', '--dr', type=float, default=0.1,
             help='learning-rate factor per decay of the step schedule')

    g = p.add_argument_group('augmentation and regularisation')
    add_flag(g, '--color-jitter', type=float, default=0.3,
             help='colour jitter strength (not applied together with --aa)')
    add_flag(g, '--aa', type=str, default='rand-m9-mstd0.5-inc1',
             help='AutoAugment/RandAugment policy; "none" to disable')
    add_flag(g, '--smoothing', type=float, default=0.1, help='label smoothing')
    add_flag(g, '--train-interpolation', type=str, default='bicubic',
             help='training interpolation: random, bilinear, bicubic')
    add_flag(g, '--repeated-aug', action='store_true',
             help='repeated augmentation (default): each image 3 times per epoch, augmented differently, on '
                  'different processes')
    add_flag(g, '--no-repeated-aug', action='store_false', dest='repeated_aug', help='no repeated augmentation')
    p.set_defaults(repeated_aug=True)
    add_flag(g, '--reprob', type=float, default=0.25, help='random-erasing probability')
    add_flag(g, '--remode', type=str, default='pixel', help='random-erasing fill mode: const, rand, pixel')
    add_flag(g, '--recount', type=int, default=1, help='random-erasing count')
    add_flag(g, '--mixup', type=float, default=0.8, help='mixup alpha (0 = off)')
    add_flag(g, '--cutmix', type=float, default=1.0, help='cutmix alpha (0 = off)')
    add_flag(g, '--cutmix-minmax', type=float, nargs='+', default=None,
             help='cutmix min/max area ratio (overrides alpha)')
    add_flag(g, '--mixup-prob', type=float, default=1.0, help='probability of applying mixup or cutmix per batch')
    add_flag(g, '--mixup-switch-prob', type=float, default=0.5,
             help='probability of cutmix instead of mixup when both are on')
    add_flag(g, '--mixup-mode', type=str, default='batch', help='mixup parameters per "batch", "pair" or "elem"')

    g = p.add_argument_group('distillation')
    add_flag(g, '--teacher-model', default='regnety_160', type=str, help='timm name of the teacher')
    add_flag(g, '--teacher-path', type=str, default='', help='teacher weights (file or URL)')
    add_flag(g, '--distillation-type', default='none', choices=['none', 'soft', 'hard'], type=str,
             help='distillation loss')
    add_flag(g, '--distillation-alpha', default=0.5, type=float, help='weight of the distillation loss')
    add_flag(g, '--distillation-tau', default=1.0, type=float, help='temperature of soft distillation')

    g = p.add_argument_group('data')
    add_flag(g, '--data-path', default='data', type=str,
             help='dataset root: train/ and val/ class folders (IMNET, folder), train.tar and val.tar (tar), '
                  'the CIFAR or iNaturalist folder, the cache of hfds/ data sets; for DIGITS only read without '
                  'scikit-learn (digits.npz)')
    add_flag(g, '--data-set', default='IMNET', type=data_set_name,
             metavar='|'.join([*DATA_SETS, *(p + 'NAME' for p in TIMM_PREFIXES)]),
             help='IMNET or folder: <data-path>/{train,val}/<class>/<images> (any format Pillow reads); tar: '
                  '<data-path>/{train,val}.tar holding <class>/<image> files; CIFAR10, CIFAR100 (CIFAR = '
                  'CIFAR100 as in DeiT); INAT (2018), INAT19; DIGITS: scikit-learn\'s 8x8 handwritten digits, '
                  'upsampled (built in, no download); torch/NAME: timm\'s create_dataset (torchvision\'s data '
                  'sets, e.g. torch/mnist, torch/stl10, torch/folder; add --download to fetch them); hfds/NAME: a '
                  'Hugging Face data set with an image and a class-label column (--input-key, --target-key; pip install datasets), a Hub name (e.g. '
                  'hfds/timm/mini-imagenet) or a local folder (e.g. hfds//data/pets of train/ and val/ class '
                  'folders, or of parquet files)')
    add_flag(g, '--train-split', default='train', metavar='SPLIT',
             help='split of a torch/ or hfds/ data set to train on (hfds/ also takes slices, e.g. train[:90%%])')
    add_flag(g, '--val-split', default='validation', metavar='SPLIT',
             help='split of a torch/ or hfds/ data set to validate on, e.g. test or train[90%%:] (the val/ folder '
                  'of a local hfds/ data set is its validation split)')
    add_flag(g, '--input-key', default='image', metavar='COLUMN',
             help='column of an hfds/ data set holding the images (as timm names it)')
    add_flag(g, '--target-key', default='label', metavar='COLUMN',
             help='class-label column of an hfds/ data set (e.g. fine_label of cifar100)')
    add_flag(g, '--max-bad-images', default=100, type=int, metavar='N',
             help='unreadable images (corrupt, truncated, empty, not an image) are skipped, each named in the '
                  'log and replaced by another image; the run stops when one epoch (or an evaluation) meets more '
                  'than N')
    add_flag(g, '--strict-images', action='store_const', const=0, dest='max_bad_images',
             help='stop at the first unreadable image (--max-bad-images 0)')
    add_flag(g, '--verify-images', action='store_true',
             help='decode every training and validation image with --num-workers processes, list the unreadable '
                  'ones, then exit (code 0 when all are readable, else 2); run it with one process')
    add_flag(g, '--download', action='store_true',
             help='download CIFAR (or a torch/NAME data set) into --data-path if missing')
    add_flag(g, '--eval-crop-ratio', default=0.875, type=float,
             help='evaluation: resize to input-size / ratio, then centre crop')
    add_flag(g, '--num-workers', default=None, type=int,
             help='data-loader worker processes per training process (default: the CPU cores this process may use, '
                  'shared among the training processes of the node, less one for the process itself, at most 16)')
    add_flag(g, '--input-pipeline', default='cpu', choices=['cpu', 'gpu'],
             help='training images: cpu decodes and augments in the loader workers; gpu has the workers read file '
                  'bytes only and decodes (nvJPEG) and augments whole batches on the GPU, for when the CPU cores '
                  'cannot keep up with the model. Evaluation always uses the CPU')
    add_flag(g, '--pin-mem', action='store_true',
             help='pin CPU memory for faster host-to-GPU copies (default, GPU only)')
    add_flag(g, '--no-pin-mem', action='store_false', dest='pin_mem', help='do not pin memory')
    p.set_defaults(pin_mem=True)

    g = p.add_argument_group('run')
    add_flag(g, '--output-dir', default='',
             help='where checkpoint.pth, best_checkpoint.pth, log.txt and tensorboard/ go; an existing '
                  'checkpoint.pth there is resumed automatically')
    add_flag(g, '--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    add_flag(g, '--seed', default=0, type=int, help='random seed')
    add_flag(g, '--resume', default='',
             help='checkpoint to resume from or, with --eval, to evaluate; when --output-dir already has '
                  'checkpoint.pth, training resumes that one instead. A resumed run takes its hyperparameters '
                  '(--lr, --epochs, --min-lr, --clip-grad, worker counts, ...) from the command line and '
                  'rebuilds the schedule from them (see the end of --help)')
    add_flag(g, '--start-epoch', default=0, type=int, help='first epoch when not resuming')
    add_flag(g, '--finetune', default='',
             help='initialise from these weights: position embeddings resampled, a head of another shape '
                  'dropped')
    add_flag(g, '--eval', action='store_true',
             help='only evaluate (the checkpoint of --resume; its EMA too when it has one)')
    add_flag(g, '--eval-untrained', action='store_true',
             help='allow --eval without a checkpoint (--resume or OUTPUT_DIR/checkpoint.pth): evaluate the '
                  'randomly initialised weights')
    add_flag(g, '--dist-eval', action='store_true',
             help='split evaluation over the processes (default: every process evaluates everything)')
    add_flag(g, '--print-freq', default=10, type=int, help='iterations between progress lines')
    add_flag(g, '--save-every-steps', default=0, type=int,
             help='also write checkpoint.pth every this many steps within an epoch (0 = only at epoch ends)')
    add_flag(g, '--bce-loss', action='store_true',
             help='binary cross-entropy against (mixed) targets > 0, as DeiT III (use with --smoothing 0: '
                  'smoothed targets are all > 0)')

    g = p.add_argument_group('precision and non-finite steps')
    add_flag(g, '--if-amp', action='store_true', default=None,
             help='autocast mixed precision (default: on for CUDA, off for CPU)')
    add_flag(g, '--no-amp', action='store_false', dest='if_amp', help='full fp32 (the published recipes)')
    add_flag(g, '--fp32-matmul', default='3xtf32', choices=policy.MODES,
             help='how CUDA fp32 matmuls run. 3xtf32: the Mamba in_proj, x_proj (compiled only) and out_proj '
                  'on TF32 tensor cores in three products, at least as accurate as IEEE fp32 at Vim\'s shapes '
                  '(against float64), and faster than IEEE fp32 in compiled training. ieee: cuBLAS IEEE fp32 '
                  'everywhere. tf32: every matmul in TF32 (10-bit mantissa inputs), fastest, least accurate. '
                  'Autocast runs its matmuls in bf16/fp16 whatever this says')
    add_flag(g, '--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'],
             help='autocast dtype. bfloat16 has fp32\'s exponent range, so it needs no loss scaling and does '
                  'not overflow the way fp16 did in the original (NaN losses); float16 uses a gradient scaler')
    add_flag(g, '--if-nan2num', action='store_true',
             help='replace a NaN/inf loss by a finite number (torch.nan_to_num) before backward')
    add_flag(g, '--if-continue-inf', action='store_true',
             help='never stop on non-finite steps (they are still skipped and counted)')
    add_flag(g, '--max-nonfinite-steps', default=20, type=int,
             help='stop after this many consecutive steps with a non-finite loss or gradient (each is skipped, '
                  'weights untouched)')

    g = p.add_argument_group('distributed (set by torchrun or SLURM)')
    add_flag(g, '--dist-url', default='env://', help='process-group rendezvous URL')
    add_flag(g, '--dist-timeout', default=900, type=float, metavar='SECONDS',
             help='how long a process waits for the others in a collective (gloo and NCCL) before the job stops '
                  'with an error naming the cause: a hung or stopped process ends the job instead of freezing it')
    add_flag(g, '--local-rank', default=0, type=int,
             help='GPU index of this process on its node, as torch.distributed.launch passes it; the LOCAL_RANK '
               '(torchrun) or SLURM_LOCALID variable takes precedence. The number of processes comes from '
               'WORLD_SIZE or SLURM_NTASKS')
    return p


def resolve_model_name(name):
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = (f'close names: {", ".join(close)}' if close
            else 'list them with: python -c "import timm, vim; print(timm.list_models(\'vim*\'))"')
    raise UserError(f'unknown --model {name}; {hint}')


def create_model(name, model_kwargs=(), **kwargs):
    """timm.create_model with the user's `--model-kwargs` (KEY=VALUE pairs) on top of `kwargs`."""
    resolve_model_name(name)
    model_kwargs = dict(model_kwargs)
    try:
        return timm.create_model(name, pretrained=False, **{**kwargs, **model_kwargs})
    except (TypeError, ValueError) as err:
        raise UserError(rejected_model_kwargs(name, model_kwargs, err)) from None


def rejected_model_kwargs(name, model_kwargs, err):
    """The message for a model constructor that rejects `--model-kwargs`, naming the likely culprit."""
    reason = str(err).strip().splitlines()[0].rstrip(':') if str(err).strip() else type(err).__name__
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", reason)
    if unexpected:
        return f'--model {name} has no argument {unexpected.group(1)}: drop it from --model-kwargs'
    texts = [f'{key}={value}' for key, value in model_kwargs.items() if isinstance(value, str)]
    if texts:
        return (f'--model-kwargs {" ".join(texts)}: not a Python literal, so passed as text, which --model {name} '
                f'rejects ({reason}); give KEY=VALUE with VALUE a number, True/False/None, a list or a quoted '
                f'string, e.g. depth=24')
    shown = ' '.join(f'{key}={value!r}' for key, value in model_kwargs.items()) or '(none given)'
    return f'--model {name} rejects its arguments ({reason}); check --model-kwargs {shown}'


def check_input_size(model, name, size):
    """A patch embedding of kernel k and stride s covers a side exactly when size = k + a multiple of s."""
    proj = getattr(getattr(model, 'patch_embed', None), 'proj', None)
    if not isinstance(proj, torch.nn.Conv2d):
        return
    k, s = proj.kernel_size[0], proj.stride[0]
    if size < k or (size - k) % s:
        below = k + max(size - k, 0) // s * s
        fits = f'{below} or {below + s}' if size > k else str(k)
        raise UserError(f'--input-size {size} does not fit --model {name} (patch {k}, stride {s}): use {k} plus a '
                        f'multiple of {s}, e.g. --input-size {fits}')


def check_args(args):
    if args.compile == 'none':  # a later flag overriding a recipe's --compile
        args.compile = None
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {args.device} but no CUDA device is available: use --device cpu')
    if args.input_pipeline == 'gpu' and not args.device.startswith('cuda'):
        raise UserError(f'--input-pipeline gpu decodes and augments on a CUDA device, but --device is {args.device}: '
                        f'use --input-pipeline cpu')
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    for flag, value, least in (('--batch-size', args.batch_size, 1), ('--epochs', args.epochs, 1),
                               ('--num-workers', args.num_workers, 0), ('--lr', args.lr, 0),
                               ('--min-lr', args.min_lr, 0), ('--warmup-lr', args.warmup_lr, 0),
                               ('--warmup-epochs', args.warmup_epochs, 0), ('--weight-decay', args.weight_decay, 0)):
        if value < least:
            raise UserError(f'{flag} {value}: must be at least {least}')
    if args.clip_grad is not None and args.clip_grad <= 0:
        raise UserError(f'--clip-grad {args.clip_grad}: must be positive (leave it out to not clip)')
    if args.dist_timeout <= 0:
        raise UserError(f'--dist-timeout {args.dist_timeout}: must be a positive number of seconds')
    if not args.eval and mixup_active(args) and args.batch_size % 2:
        raise UserError(f'--batch-size {args.batch_size} is odd, but mixup/cutmix pair up the images of a batch: '
                        f'use an even --batch-size or --mixup 0 --cutmix 0')
    if args.distillation_type != 'none' and not args.teacher_path:
        raise UserError(f'--distillation-type {args.distillation_type} needs --teacher-path with the weights of '
                        f'--teacher-model')
    if args.finetune and args.eval:
        raise UserError('--finetune with --eval: evaluate a checkpoint with --eval --resume CHECKPOINT')
    if args.fp32_matmul == 'tf32' and not args.device.startswith('cuda'):
        raise UserError(f'--fp32-matmul tf32 selects CUDA tensor cores; it does nothing on --device {args.device}: '
                        f'drop it')


def default_num_workers():
    """The CPU cores this process may use, shared among the node's training processes, less one, at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    local = os.environ.get('LOCAL_WORLD_SIZE') or os.environ.get('SLURM_NTASKS_PER_NODE', '1').split('(')[0]
    return max(1, min(16, cores // max(1, int(local)) - 1))


def mixup_active(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def build_criterion(args, num_classes, device):
    if args.bce_loss:  # as DeiT III: a class is present when its (mixed or one-hot) target is above 0
        base = BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)
    elif mixup_active(args):
        base = SoftTargetCrossEntropy()  # mixup already folds label smoothing into the targets
    elif args.smoothing:
        base = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base = torch.nn.CrossEntropyLoss()
    teacher = None
    if args.distillation_type != 'none':
        teacher = create_model(args.teacher_model, num_classes=num_classes)
        weights = model_state_dict(open_checkpoint(args.teacher_path), f'teacher {args.teacher_path}')
        check_compatible(weights, teacher, args.teacher_model, f'teacher {args.teacher_path}')
        teacher.load_state_dict(weights)
        teacher.to(device).eval()
    return DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau)


# timm optimizer names whose torch implementation has a fused CUDA kernel (the `fused=True` flag).
FUSED_OPTIMIZERS = ('adam', 'adamw')


def build_optimizer(model, args, lr):
    no_decay = set(getattr(model, 'no_weight_decay', lambda: ())())
    if args.ssm_no_weight_decay:  # A_log, A_b_log, D, D_b, as the Mamba mixer marks them; full names: older
        # timm matches the list exactly, newer as patterns
        no_decay |= {name for name, p in model.named_parameters() if getattr(p, '_no_weight_decay', False)}
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=no_decay)
    extra = {'eps': args.opt_eps}
    if args.opt_betas:
        extra['betas'] = tuple(args.opt_betas)
    if args.opt.lower() in FUSED_OPTIMIZERS and next(model.parameters()).is_cuda:
        extra['fused'] = True  # one fused multi-tensor kernel instead of a sequence of foreach ops
    return create_optimizer_v2(groups, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                               **extra)


def train_loader(dataset, args, seed, pin_memory):
    sampler = ResumableSampler(len(dataset), get_world_size(), get_rank(), shuffle=True,
                               repeats=3 if args.repeated_aug else 1, seed=seed)
    steps = sampler.num_samples // args.batch_size
    if steps == 0:
        raise UserError(f'the training set has {len(dataset)} images, {sampler.num_samples} per process: too few for '
                        f'one batch of --batch-size {args.batch_size} on {get_world_size()} process(es); '
                        f'lower --batch-size')
    # The loader's own generator keeps iterator creation from consuming the global random stream.
    common = dict(sampler=sampler, batch_size=args.batch_size, drop_last=True, num_workers=args.num_workers,
                  pin_memory=pin_memory, persistent_workers=args.num_workers > 0,
                  worker_init_fn=shield_loader_worker, generator=torch.Generator().manual_seed(seed))
    if hasattr(dataset, 'collate'):  # the GPU input path's encoded batches (GpuTrainLoader counts unreadable files)
        loader = DataLoader(SeededDataset(dataset), collate_fn=dataset.collate, **common)
    else:
        loader = CountingLoader(SeededDataset(dataset), BadImageCount(args.max_bad_images, 'training'), **common)
    return loader, sampler, steps


def eval_loader(dataset, args, pin_memory):
    # Without padding, so that accuracy counts each test image exactly once.
    indices = range(get_rank(), len(dataset), get_world_size()) if args.dist_eval else range(len(dataset))
    purpose = 'evaluation' if args.eval else 'validation'  # validation: within a training run
    return CountingLoader(dataset, BadImageCount(args.max_bad_images, purpose), drop_substitutes=True,
                          sampler=indices, batch_size=args.eval_batch_size or 2 * args.batch_size,
                          num_workers=args.num_workers, pin_memory=pin_memory, drop_last=False,
                          worker_init_fn=shield_loader_worker, generator=torch.Generator().manual_seed(0))


def report_accuracy(stats, label='network'):
    log(f'Accuracy of the {label} on the {stats["num_images"]} test images: {stats["acc1"]:.1f}%')


def main(args):
    check_args(args)
    if args.verify_images:
        return verify_images(args)
    init_distributed_mode(args)
    # Only the main process writes to the output dir, and it holds the lock for the whole run.
    lock = OutputDirLock(args.output_dir) if args.output_dir and is_main_process() else None
    if args.output_dir:
        main_process_check(lambda: (check_writable(args.output_dir), lock.acquire()))
    try:
        run(args)
    finally:
        if lock is not None:
            lock.release()


def run(args):
    checkpoint_path = os.path.join(args.output_dir, 'checkpoint.pth') if args.output_dir else ''
    own = checkpoint_path if checkpoint_path and os.path.isfile(checkpoint_path) else ''
    # A restarted run continues from its own latest checkpoint, even when --resume names another file.
    resume = (args.resume or own) if args.eval else (own or args.resume)
    if args.eval and not resume and not args.eval_untrained:
        raise UserError('--eval without a checkpoint would evaluate untrained weights: pass --resume CHECKPOINT '
                        '(or add --eval-untrained to evaluate the random initialisation)')
    device = torch.device(f'cuda:{args.gpu}' if args.device.startswith('cuda') and args.distributed else args.device)
    seed_everything(args.seed + get_rank())
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        policy.set_mode(args.fp32_matmul)
    use_amp = args.if_amp if args.if_amp is not None else device.type == 'cuda'
    amp_dtype = getattr(torch, args.amp_dtype) if use_amp else None
    precision = f'autocast {args.amp_dtype}' if use_amp else 'fp32'
    if device.type == 'cuda' and not use_amp:
        no_triton = args.fp32_matmul == '3xtf32' and linear_3xtf32.kernels is None
        precision += ' (ieee matmuls: 3xtf32 needs Triton)' if no_triton else f' ({args.fp32_matmul} matmuls)'
    log(f'{args.model} on {device} x {get_world_size()}, {precision}')

    # The number of classes comes from the training set, as in DeiT; evaluation alone reads only val/.
    dataset_train, num_classes = (None, None) if args.eval else build_dataset(True, args)
    dataset_val, val_classes = build_dataset(False, args)
    if dataset_train is None:
        num_classes = val_classes
    else:
        check_class_sets(dataset_train, dataset_val)
    pin_memory = args.pin_mem and device.type == 'cuda'
    data_loader_val = eval_loader(dataset_val, args, pin_memory)
    model = create_model(args.model, args.model_kwargs, num_classes=num_classes, drop_rate=args.drop,
                         drop_path_rate=args.drop_path, img_size=args.input_size)
    check_input_size(model, args.model, args.input_size)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f'number of params: {n_parameters}')

    checkpoint = open_checkpoint(resume) if resume else None
    if checkpoint is not None:
        weights = model_state_dict(checkpoint, resume)
        check_compatible(weights, model, args.model, resume)
        model.load_state_dict(weights)
        log(f'loaded {resume}')
    elif args.finetune:
        dropped = load_finetune_weights(model, open_checkpoint(args.finetune), args.finetune)
        log(f'fine-tuning from {args.finetune}' + (f'; re-initialised {", ".join(dropped)}' if dropped else ''))
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)

    if args.eval:
        if args.compile:
            log('--compile applies to training; evaluating the model uncompiled')
        report_accuracy(evaluate(data_loader_val, model, device, amp_dtype, args.dist_eval))
        if checkpoint is not None and checkpoint.get('model_ema') is not None:
            check_compatible(checkpoint['model_ema'], model, args.model, f'{resume} (model_ema)')
            model.load_state_dict(checkpoint['model_ema'])
            report_accuracy(evaluate(data_loader_val, model, device, amp_dtype, args.dist_eval), 'EMA network')
        return

    if args.input_pipeline == 'gpu':
        dataset_train = gpu_input.encoded_dataset(dataset_train, args.data_set)
    data_loader_train, sampler_train, steps_per_epoch = train_loader(
        dataset_train, args, args.seed, pin_memory and args.input_pipeline == 'cpu')
    if args.input_pipeline == 'gpu':
        data_loader_train = gpu_input.GpuTrainLoader(data_loader_train, dataset_train.augmentation, device,
                                                     bad_images=BadImageCount(args.max_bad_images, 'training'))
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                           device=torch.device('cpu') if args.model_ema_force_cpu else None) if args.model_ema else None
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    if args.compile:
        log(f'training through torch.compile(mode={args.compile}): the first steps compile')
        model = torch.compile(model, mode=None if args.compile == 'default' else args.compile)
    global_batch = args.batch_size * get_world_size()
    lr = args.lr if args.unscale_lr else args.lr * global_batch / 512.0
    optimizer = build_optimizer(model_without_ddp, args, lr)
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if use_amp and amp_dtype == torch.float16 else None
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=num_classes) if mixup_active(args) else None
    criterion = build_criterion(args, num_classes, device)

    # max_accuracy -1: no best checkpoint yet
    start_epoch, start_step, max_accuracy, pending_train_stats = args.start_epoch, 0, -1.0, None
    if checkpoint is not None and 'optimizer' in checkpoint and 'epoch' in checkpoint:
        start_epoch, start_step, max_accuracy, pending_train_stats = restore_training_state(
            checkpoint, resume, args, optimizer=optimizer, model_ema=model_ema, scaler=scaler,
            global_batch=global_batch, steps_per_epoch=steps_per_epoch)

    def save_checkpoint(epoch, steps_done, *, end_of_epoch=False, best=False, train_stats=None):
        """Collective: every process contributes its random state; the main process writes checkpoint.pth
        (and first best_checkpoint.pth, the same state, when `best`).

        `end_of_epoch`: the epoch is trained, evaluated and logged (this save commits it). Otherwise the
        state is `steps_done` steps into `epoch`; all its steps, with its averages `train_stats`, when only
        its end (evaluation, log) is pending.
        """
        rng_states = [None] * get_world_size()
        if args.distributed:
            dist.all_gather_object(rng_states, capture_rng_state())
        else:
            rng_states[0] = capture_rng_state()
        if checkpoint_path and is_main_process():
            state = {
                'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(),
                'lr_scheduler': lr_scheduler.state_dict(),
                # `epoch` is the last completed epoch (the DeiT convention); a save inside an epoch adds the
                # steps done in the next one.
                'epoch': epoch if end_of_epoch else epoch - 1,
                'step_in_epoch': 0 if end_of_epoch else steps_done, 'global_batch': global_batch,
                'scaler': scaler.state_dict() if scaler is not None else None,
                'args': vars(args), 'rng_state': rng_states, 'max_accuracy': max_accuracy,
            }
            if model_ema is not None:
                state['model_ema'] = model_ema.module.state_dict()
            if train_stats is not None:
                state['train_stats'] = train_stats
            if best:  # before checkpoint.pth, which commits the epoch
                save_atomic(state, os.path.join(args.output_dir, 'best_checkpoint.pth'))
            save_atomic(state, checkpoint_path)
            log(f'saved {checkpoint_path} (epoch {epoch}, {steps_done}/{steps_per_epoch} steps)')
        if args.distributed:
            dist.barrier()  # nobody exits (and gets the others killed by torchrun) before the file is complete

    writer = tensorboard_writer(args.output_dir) if args.output_dir and is_main_process() else None
    log(f'training for {args.epochs} epochs from epoch {start_epoch}, step {start_step}; '
        f'{steps_per_epoch} steps of {global_batch} images per epoch; lr {lr:.3g}')
    start_time = time.time()
    with StopRequest() as stop_request:
        for epoch in range(start_epoch, args.epochs):
            if start_step == steps_per_epoch:  # trained before a stop; only its end (evaluation, log) is pending
                train_stats = pending_train_stats
            else:
                sampler_train.set_epoch(epoch, start=start_step * args.batch_size)
                train_stats = train_one_epoch(
                    model, criterion, data_loader_train, optimizer, device, epoch, args, lr_scheduler=lr_scheduler,
                    steps_per_epoch=steps_per_epoch, start_step=start_step, scaler=scaler, amp_dtype=amp_dtype,
                    model_ema=model_ema, mixup_fn=mixup_fn, stop_request=stop_request, save_checkpoint=save_checkpoint)
            start_step = 0
            # the bare model: DDP's forward could wait on processes that hold fewer test batches
            test_stats = evaluate(data_loader_val, model_without_ddp, device, amp_dtype, args.dist_eval)
            report_accuracy(test_stats)
            improved = test_stats['acc1'] > max_accuracy  # the same on every process
            max_accuracy = max(max_accuracy, test_stats['acc1'])
            log(f'Max accuracy: {max_accuracy:.2f}%')
            # The epoch's end is one transaction: the log line and best_checkpoint.pth are written first,
            # checkpoint.pth last commits the epoch. A kill before that makes the resumed run redo the epoch's
            # end (its log line then replaces the earlier one). A stop request on the last step is served
            # here, after the evaluation and the log.
            log_epoch(args.output_dir, writer, epoch, n_parameters, train_stats, test_stats)
            save_checkpoint(epoch, steps_per_epoch, end_of_epoch=True, best=improved)
            if stop_request.agreed(device):
                raise Preempted(f'stopped after epoch {epoch}')
    log(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')


def saved_args(checkpoint):
    """The command-line arguments stored in a checkpoint, as a dict (the original trainer saved a Namespace)."""
    saved = checkpoint.get('args')
    return vars(saved) if isinstance(saved, argparse.Namespace) else saved if isinstance(saved, dict) else {}


def restore_training_state(checkpoint, source, args, *, optimizer, model_ema, scaler, global_batch, steps_per_epoch):
    """Load the optimizer's moments, EMA, scaler and random states; return (start epoch, start step, best
    accuracy, the start epoch's training averages when only its end is pending).

    The hyperparameters of the command line win over the saved ones (the optimizer's param groups keep
    their new lr, weight decay, ...) and the learning-rate schedule, built from the command line, is not
    restored: it is a function of the global step, so a changed --lr or --epochs applies from the next step.
    """
    saved_opt = saved_args(checkpoint).get('opt')
    if saved_opt and saved_opt.lower() != args.opt.lower():
        raise UserError(f'{source} was trained with --opt {saved_opt}, not --opt {args.opt}: resume with --opt '
                        f'{saved_opt}, or start a new --output-dir with --finetune {source}')
    hyperparameters = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError) as err:
        raise UserError(f'the optimizer state in {source} does not fit this run ({err}): resume with the --opt and '
                        f'weight-decay flags it was trained with, or start a new --output-dir with --finetune '
                        f'{source}') from None
    for group, values in zip(optimizer.param_groups, hyperparameters):
        group.update(values)
    if model_ema is not None:
        if checkpoint.get('model_ema') is not None:
            model_ema.module.load_state_dict(checkpoint['model_ema'])
        else:
            log(f'{source} has no model_ema: the EMA restarts from the loaded weights')
    if scaler is not None and checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    start_step = 0
    if checkpoint.get('step_in_epoch'):
        samples_done = checkpoint['step_in_epoch'] * checkpoint.get('global_batch', global_batch)
        start_step = min(samples_done // global_batch, steps_per_epoch)
        if samples_done % global_batch:
            log(f'global batch changed from {checkpoint["global_batch"]} to {global_batch}: resuming at step '
                f'{start_step}, a few images of this epoch are seen twice')
    rng_states = checkpoint.get('rng_state') or []
    if len(rng_states) == get_world_size():
        restore_rng_state(rng_states[get_rank()])
    else:
        log(f'{source} holds random states of {len(rng_states)} processes, not {get_world_size()}: random streams '
            f'restart from --seed')
    log(f'resuming {source} at epoch {checkpoint["epoch"] + 1}, step {start_step}')
    pending_train_stats = checkpoint.get('train_stats', {}) if start_step == steps_per_epoch else None
    return checkpoint['epoch'] + 1, start_step, checkpoint.get('max_accuracy', -1.0), pending_train_stats


def tensorboard_writer(output_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(output_dir, 'tensorboard'))


def log_epoch(output_dir, writer, epoch, n_parameters, train_stats, test_stats):
    if not output_dir or not is_main_process():
        return
    record = {**{f'train_{k}': v for k, v in train_stats.items()}, **{f'test_{k}': v for k, v in test_stats.items()},
              'epoch': epoch, 'n_parameters': n_parameters}
    path = os.path.join(output_dir, 'log.txt')
    lines = []
    if os.path.exists(path):
        with open(path) as f:  # a resumed run that redoes an epoch's end replaces that epoch's line
            lines = [line for line in f if logged_epoch(line) < epoch]
    write_atomic(path, lambda f: f.write(''.join([*lines, json.dumps(record) + '\n']).encode()))
    if writer is not None:
        for key, value in record.items():
            if key not in ('epoch', 'n_parameters'):
                writer.add_scalar(key.replace('_', '/', 1), value, epoch)
        writer.flush()


def logged_epoch(line):
    try:
        return json.loads(line)['epoch']
    except (ValueError, KeyError, TypeError):
        return -1  # kept: not a line of this trainer


def loader_worker_death(err):
    """The one-line explanation when `err` says that the OS ended a data-loader worker, else None."""
    match = re.search(r'DataLoader worker \(pid\(?s?\)? ([\d, ]+)\) (exited unexpectedly|is killed by signal: \w+)',
                      str(err))
    if not isinstance(err, RuntimeError) or not match:
        return None
    if match.group(2).endswith(('Terminated', 'Interrupt')):  # someone else's signal, not the system's
        cause = ('a signal meant for the trainer reached its loader workers: send SIGTERM to the main process only, '
                 'or SIGUSR1')
    else:
        cause = 'most likely ended by the system for lack of memory: lower --num-workers (or --batch-size)'
    return f'data-loader worker {match.group(1)} {match.group(2)}, {cause}; rerun to resume from the last checkpoint'


def user_message(err):
    # Errors raised in a data-loader worker come back with the worker's traceback prepended.
    line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return line.split(f'{type(err).__name__}: ', 1)[-1]


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        with stop_at_once():
            main(args)
        code = 0
    except UserError as err:
        print(f'error: {user_message(err)}', file=sys.stderr)
        code = 2
    except TrainingDiverged as err:
        print(f'error: {err}', file=sys.stderr)
        code = 3
    except Preempted as err:
        if not args.output_dir:
            saved = 'nothing saved (no --output-dir)'
        elif err.saved:
            saved = 'checkpoint saved, rerun the same command to continue'
        else:
            saved = 'nothing was lost since the last save; rerun the same command to continue'
        print(f'{err}; {saved} (exit code {PREEMPTED_EXIT_CODE})', file=sys.stderr)
        code = PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print('error: interrupted by a second Ctrl-C before the checkpoint was written; the last complete '
              'checkpoint is intact: rerun the same command to continue from it', file=sys.stderr)
        code = 130
    except RuntimeError as err:
        if message := collective_timeout(err, args.dist_timeout):
            code = 1
        elif message := loader_worker_death(err):
            code = 2
        else:
            raise
        print(f'error: {message}', file=sys.stderr)
    finally:
        if is_dist_avail_and_initialized():
            dist.destroy_process_group()
    return code


if __name__ == '__main__':
    sys.exit(cli())
