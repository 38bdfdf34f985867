"""The trainer end to end on CPU: checkpoints, exact resume, evaluation of original-format files,
fine-tuning at stride 8, and two gloo processes against one."""
import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import main
from datasets import build_dataset
from trainer.checkpoint import load_finetune_weights, open_checkpoint
from trainer.samplers import ResumableSampler, SeededDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ['--model', 'vim_tiny_patch16_224', '--model-kwargs', 'depth=2', 'embed_dim=32', '--input-size', '32']
CLASSES = ('circle', 'square', 'stripes')

pytestmark = pytest.mark.usefixtures('one_thread')


def make_image_folder(root, per_class=8, val_per_class=2, seed=0):
    """train/ and val/ folders of 32x32 PNGs: one distinct colour pattern per class, plus noise."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', per_class), ('val', val_per_class)):
        for c, name in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                base = np.zeros((32, 32, 3), dtype=np.float64)
                base[..., c] = 200
                pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f'{i}.png'))
    return str(root)


def tiny_args(data, output_dir, *extra):
    return [*TINY_MODEL, '--data-set', 'folder', '--data-path', data, '--output-dir', str(output_dir),
            '--batch-size', '4', '--num-workers', '0', '--device', 'cpu', '--print-freq', '1000', *extra]


def tiny_model(**overrides):
    kwargs = dict(num_classes=3, img_size=32, depth=2, embed_dim=32)
    return main.create_model('vim_tiny_patch16_224', **{**kwargs, **overrides})


def run_trainer(argv):
    return main.cli([str(a) for a in argv])


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_tensors(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.allclose(a[key].double(), b[key].double(), rtol=0, atol=atol), key


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('images'))


def test_one_epoch_writes_weights_only_checkpoint_and_log(image_folder, tmp_path):
    assert run_trainer(tiny_args(image_folder, tmp_path, '--epochs', '1')) == 0
    checkpoint = load(tmp_path / 'checkpoint.pth')  # would raise on any pickled object
    assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args'} <= checkpoint.keys()
    assert checkpoint['epoch'] == 0 and checkpoint['step_in_epoch'] == 0
    assert type(checkpoint['args']) is dict and checkpoint['args']['model'] == 'vim_tiny_patch16_224'
    model = tiny_model()
    model.load_state_dict(checkpoint['model'])  # strict: the weights of exactly this model
    assert (tmp_path / 'best_checkpoint.pth').is_file()
    records = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert record['epoch'] == 0 and record['n_parameters'] == sum(p.numel() for p in model.parameters())
    # 24 images, batch 4, one process: 6 steps; the lr and loss meters must exist and be finite
    assert record['train_skipped_steps'] == 0 and np.isfinite(record['train_loss'])
    assert record['test_num_images'] == 6 and 0 <= record['test_acc1'] <= 100


def test_tensorboard_scalars_match_the_log(image_folder, tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert run_trainer(tiny_args(image_folder, tmp_path, '--epochs', '1')) == 0
    record = json.loads((tmp_path / 'log.txt').read_text())
    events = EventAccumulator(str(tmp_path / 'tensorboard'))
    events.Reload()
    assert {'train/loss', 'train/lr', 'test/acc1', 'test/loss'} <= set(events.Tags()['scalars'])
    assert events.Scalars('train/loss')[0].value == pytest.approx(record['train_loss'])
    assert events.Scalars('test/acc1')[0].value == pytest.approx(record['test_acc1'])


@pytest.mark.parametrize('precision', [[], ['--if-amp', '--amp-dtype', 'float16']], ids=['fp32', 'fp16-scaler'])
def test_two_epochs_equal_one_then_resume(image_folder, tmp_path, precision):
    # A step schedule decays every epoch independently of --epochs, so both runs share one schedule;
    # mixup, repeated augmentation, drop-path and EMA all draw on the random streams that must resume;
    # fp16's loss scale (halved on overflow) must resume too.
    common = ['--sched', 'step', '--decay-epochs', '1', '--decay-rate', '0.5', '--warmup-epochs', '0',
              '--drop-path', '0.1', '--model-ema-decay', '0.9', *precision]
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    assert run_trainer(tiny_args(image_folder, straight, '--epochs', '2', *common)) == 0
    assert run_trainer(tiny_args(image_folder, split, '--epochs', '1', *common)) == 0
    after_one = load(split / 'checkpoint.pth')
    assert after_one['epoch'] == 0
    assert run_trainer(tiny_args(image_folder, split, '--epochs', '2', *common)) == 0  # resumes automatically
    a, b = load(straight / 'checkpoint.pth'), load(split / 'checkpoint.pth')
    assert a['epoch'] == b['epoch'] == 1
    assert_same_tensors(a['model'], b['model'])
    assert_same_tensors(a['model_ema'], b['model_ema'])
    assert a['scaler'] == b['scaler'] and (a['scaler'] is None) == (not precision)
    assert a['optimizer']['param_groups'][0]['lr'] == b['optimizer']['param_groups'][0]['lr']
    assert a['optimizer']['param_groups'][0]['lr'] == pytest.approx(after_one['optimizer']['param_groups'][0]['lr'] / 2)
    assert any(not torch.equal(after_one['model'][k], b['model'][k]) for k in b['model'])  # epoch 2 did train


def test_eval_of_original_format_checkpoint(image_folder, tmp_path, capsys):
    # Head weights 0 and a bias favouring class 1: every image is predicted as class 1, so exactly the
    # 2 of 6 validation images of that class are right (33.3%). The EMA copy favours class 2 instead.
    model = tiny_model()
    state = model.state_dict()
    state['head.weight'].zero_()
    state['head.bias'].copy_(torch.tensor([0.0, 10.0, 0.0]))
    ema = {k: v.clone() for k, v in state.items()}
    ema['head.bias'] = torch.tensor([0.0, 0.0, 10.0])
    path = tmp_path / 'original.pth'
    torch.save({'model': state, 'args': argparse.Namespace(model='vim_tiny', lr=5e-4)}, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # the reason the Namespace must be allow-listed
    assert run_trainer(tiny_args(image_folder, tmp_path / 'out', '--eval', '--resume', path)) == 0
    out = capsys.readouterr().out
    assert 'Accuracy of the network on the 6 test images: 33.3%' in out
    assert 'EMA' not in out

    torch.save({'model': state, 'model_ema': ema, 'args': argparse.Namespace(model='vim_tiny')}, path)
    assert run_trainer(tiny_args(image_folder, tmp_path / 'out', '--eval', '--resume', path)) == 0
    out = capsys.readouterr().out
    assert 'Accuracy of the network on the 6 test images: 33.3%' in out
    assert 'Accuracy of the EMA network on the 6 test images: 33.3%' in out


def test_finetune_stride16_into_stride8(image_folder, tmp_path, capsys):
    source = tiny_model(num_classes=7)
    path = tmp_path / 'pretrained.pth'
    torch.save({'model': source.state_dict(), 'args': argparse.Namespace(model='vim_tiny')}, path)

    target = main.create_model('vim_tiny_patch16_stride8_224', num_classes=3, img_size=32, depth=2, embed_dim=32)
    dropped = load_finetune_weights(target, open_checkpoint(str(path)), str(path))
    assert dropped == ['head.bias', 'head.weight']
    old, new = source.state_dict(), target.state_dict()
    # 32 px: a 2x2 grid at stride 16 (5 tokens), a 3x3 grid at stride 8 (10 tokens), class token in the middle
    assert old['pos_embed'].shape == (1, 5, 32) and new['pos_embed'].shape == (1, 10, 32)
    assert torch.equal(new['pos_embed'][0, 9 // 2], old['pos_embed'][0, 4 // 2])
    for key in old:
        if key not in ('pos_embed', 'head.weight', 'head.bias'):
            assert torch.equal(old[key], new[key]), key
    assert new['head.weight'].shape == (3, 32)

    argv = ['--model', 'vim_tiny_patch16_stride8_224', *TINY_MODEL[2:]]
    argv += tiny_args(image_folder, tmp_path / 'ft', '--epochs', '1', '--finetune', path)[len(TINY_MODEL):]
    assert run_trainer(argv) == 0
    assert 'fine-tuning from' in capsys.readouterr().out
    assert load(tmp_path / 'ft' / 'checkpoint.pth')['model']['pos_embed'].shape == (1, 10, 32)


def run_subprocess(argv):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    return subprocess.run([str(a) for a in argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


# Same global batch (2 x 4 = 8 against 1 x 8). Without mixup and drop-path nothing differs per process, so
# the losses and the weights must agree up to the float rounding of DDP's gradient all-reduce. The flags
# override all of the recipe's that matter when launched through scripts/pt-vim-t.sh (--compile none: the
# recipe's --compile would spend minutes compiling on 2 CPU cores).
GLOO_RUN = ['--epochs', '1', '--mixup', '0', '--cutmix', '0', '--drop-path', '0', '--no-model-ema',
            '--warmup-epochs', '0', '--weight-decay', '0.05', '--compile', 'none']


@pytest.fixture(scope='module')
def one_process_run(image_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp('one')
    one = run_subprocess([sys.executable, 'main.py', *tiny_args(image_folder, output, *GLOO_RUN), '--batch-size', '8'])
    assert one.returncode == 0, one.stderr
    assert 'on cpu x 1' in one.stdout
    return output


def launch_two(launcher, argv):
    if launcher == 'torchrun':  # through the recipe launcher, as users start it
        return run_subprocess(['bash', 'scripts/pt-vim-t.sh', '--gpus', '2', *argv])
    port = str(29500 + os.getpid() % 1000)
    # srun starts one task per process and sets these variables
    procs = [subprocess.Popen([sys.executable, 'main.py', *argv], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS='1', SLURM_NTASKS='2', SLURM_PROCID=str(rank),
                                       SLURM_LOCALID=str(rank), SLURM_NODELIST='localhost', MASTER_PORT=port))
             for rank in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    return subprocess.CompletedProcess(argv, max(p.returncode for p in procs), outputs[0][0], outputs[0][1])


@pytest.mark.parametrize('launcher, extra', [('torchrun', []), ('slurm', ['--dist-eval']),
                                             ('slurm', ['--compile', 'default'])])
def test_two_gloo_processes_match_one_process(image_folder, one_process_run, tmp_path, launcher, extra):
    two = launch_two(launcher, tiny_args(image_folder, tmp_path, *GLOO_RUN, *extra))
    assert two.returncode == 0, two.stderr
    assert 'on cpu x 2' in two.stdout
    assert ('torch.compile(mode=default)' in two.stdout) == ('--compile' in extra)
    assert ('torch.compile(' in two.stdout) == ('--compile' in extra)  # the recipe's --compile was turned off
    log_one = json.loads((one_process_run / 'log.txt').read_text())
    log_two = json.loads((tmp_path / 'log.txt').read_text())
    assert log_two['train_loss'] == pytest.approx(log_one['train_loss'], rel=1e-5)
    assert log_two['test_loss'] == pytest.approx(log_one['test_loss'], rel=1e-5)
    assert log_two['test_num_images'] == log_one['test_num_images'] == 6  # each image counted once
    assert_same_tensors(load(one_process_run / 'checkpoint.pth')['model'], load(tmp_path / 'checkpoint.pth')['model'],
                        atol=1e-5)


def test_compiled_training_matches_eager(image_folder, tmp_path):
    # SGD without momentum: weights move in proportion to the gradients (Adam would amplify rounding noise).
    common = ('--epochs', '1', '--mixup', '0', '--cutmix', '0', '--drop-path', '0', '--no-repeated-aug',
              '--reprob', '0', '--aa', 'none', '--color-jitter', '0', '--opt', 'momentum', '--momentum', '0',
              '--unscale-lr', '--warmup-epochs', '0', '--min-lr', '0', '--model-ema-decay', '0.5')
    assert run_trainer(tiny_args(image_folder, tmp_path / 'untrained', *common, '--lr', '0')) == 0
    common += ('--lr', '0.5')
    assert run_trainer(tiny_args(image_folder, tmp_path / 'eager', *common)) == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert run_trainer(tiny_args(image_folder, tmp_path / 'compiled', *common, '--compile', 'default')) == 0
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] > 0  # the steps did run compiled
    untrained = load(tmp_path / 'untrained' / 'checkpoint.pth')
    eager = load(tmp_path / 'eager' / 'checkpoint.pth')
    compiled = load(tmp_path / 'compiled' / 'checkpoint.pth')
    moved = max((eager['model'][k].double() - untrained['model'][k].double()).abs().max().item()
                for k in eager['model'])
    assert moved > 1e-2  # the steps changed the weights far beyond the tolerance below
    # Same keys (the bare model's weights were saved) and values; the EMA followed the bare model too.
    assert_same_tensors(eager['model'], compiled['model'], atol=1e-5)
    assert_same_tensors(eager['model_ema'], compiled['model_ema'], atol=1e-5)


def test_metric_logger_prints_progress_with_eta(image_folder, tmp_path, capsys):
    assert run_trainer(tiny_args(image_folder, tmp_path, '--epochs', '1', '--print-freq', '2')) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('Epoch: [0]  [')]
    # 6 steps, printed at 0, 2, 4 and the last one
    assert [re.search(r'\[\s*(\d+)/6\]', line).group(1) for line in lines] == ['0', '2', '4', '5']
    assert all(re.search(r'eta: \d+:\d\d:\d\d', line) and 'loss:' in line and 'lr:' in line for line in lines)


@pytest.mark.parametrize('exempt_ssm', [False, True])
def test_weight_decay_groups(exempt_ssm):
    model = tiny_model()
    args = main.get_args_parser().parse_args(['--weight-decay', '0.05'] + ['--ssm-no-weight-decay'] * exempt_ssm)
    optimizer = main.build_optimizer(model, args, lr=1e-3)
    decay_of = {id(p): group['weight_decay'] for group in optimizer.param_groups for p in group['params']}
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names)
    for name, param in names.items():
        leaf = name.rsplit('.', 1)[-1]
        if name in ('pos_embed', 'cls_token') or param.ndim == 1 or (exempt_ssm and leaf in ('A_log', 'A_b_log')):
            assert decay_of[id(param)] == 0.0, name
        else:  # includes the 2-D A_log / A_b_log of the original recipe
            assert decay_of[id(param)] == 0.05, name
    assert any(n.endswith('.A_log') for n in names)


def test_hard_distillation_from_a_cnn_teacher(image_folder, tmp_path, capsys):
    # A teacher whose bias always picks class 2: with alpha 1 the loss is the cross-entropy against
    # class 2 alone, whatever the labels; its first-step value is checked against a direct computation.
    teacher = main.create_model('resnet10t', num_classes=3)
    weights = teacher.state_dict()
    weights['fc.weight'].zero_()
    weights['fc.bias'].copy_(torch.tensor([0.0, 0.0, 50.0]))
    torch.save({'model': weights}, tmp_path / 'teacher.pth')
    argv = tiny_args(image_folder, tmp_path / 'out', '--epochs', '1', '--mixup', '0', '--cutmix', '0',
                     '--smoothing', '0', '--teacher-model', 'resnet10t', '--teacher-path', tmp_path / 'teacher.pth',
                     '--distillation-type', 'hard', '--distillation-alpha', '1.0', '--drop-path', '0',
                     '--print-freq', '1')
    assert run_trainer(argv) == 0
    first_loss = float(re.search(r'\[0/6\].*?loss: ([\d.]+)', capsys.readouterr().out).group(1))

    # the same first batch through the same initial student
    args = main.get_args_parser().parse_args([str(a) for a in argv])
    main.seed_everything(args.seed)
    student = tiny_model(drop_rate=0.0, drop_path_rate=0.0)
    dataset = SeededDataset(build_dataset(True, args)[0])
    sampler = ResumableSampler(len(dataset), repeats=3, seed=args.seed)
    batch = torch.stack([dataset[key][0] for key in list(sampler)[:4]])
    expected = torch.nn.functional.cross_entropy(student(batch), torch.full((4,), 2)).item()
    assert first_loss == pytest.approx(expected, abs=1e-4)


def test_bce_loss_without_mixup(image_folder, tmp_path, capsys):
    # Logits start near 0 (head std 0.02), so the first binary cross-entropy is near ln 2 = 0.693
    # (cross-entropy over 3 classes would be ln 3 = 1.099).
    argv = tiny_args(image_folder, tmp_path, '--epochs', '1', '--bce-loss', '--mixup', '0', '--cutmix', '0',
                     '--smoothing', '0', '--print-freq', '1')
    assert run_trainer(argv) == 0
    first_loss = float(re.search(r'\[0/6\].*?loss: ([\d.]+)', capsys.readouterr().out).group(1))
    assert first_loss == pytest.approx(0.693, abs=0.05)


def test_restart_prefers_its_own_checkpoint_over_resume(image_folder, tmp_path, capsys):
    first, second = tmp_path / 'first', tmp_path / 'second'
    assert run_trainer(tiny_args(image_folder, first, '--epochs', '1')) == 0
    command = tiny_args(image_folder, second, '--epochs', '2', '--resume', first / 'checkpoint.pth')
    assert run_trainer(command) == 0
    assert f'resuming {first / "checkpoint.pth"} at epoch 1' in capsys.readouterr().out
    assert run_trainer(command) == 0  # the same command again, e.g. after preemption
    assert f'resuming {second / "checkpoint.pth"} at epoch 2' in capsys.readouterr().out


def test_compile_none_overrides_a_recipes_compile():
    parse = main.get_args_parser().parse_args
    assert parse(['--compile']).compile == 'reduce-overhead'
    args = parse(['--device', 'cpu', '--compile', '--compile', 'none'])  # recipe flag, then the user's
    main.check_args(args)
    assert args.compile is None
