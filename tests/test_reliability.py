"""Faults that must lose nothing and say what happened: a second writer on one output dir, a stop or
crash at an epoch's end, mismatched class folders, changed hyperparameters on resume, a frozen rank,
signals outside the training loop, a killed loader worker, and one-line errors for bad input."""
import contextlib
import errno
import itertools
import json
import math
import os
import re
import shutil
import signal
import time

import pytest
import torch
from PIL import Image

import main
import trainer.output_dir
from test_robustness import error_of, popen, popen_any
from test_trainer import image_folder  # noqa: F401 (a fixture, shared with test_trainer)
from test_trainer import load, make_image_folder, run_trainer, tiny_args, tiny_model
from trainer import UserError
from trainer.image_files import ImageSource
from trainer.output_dir import LOCK_NAME, OutputDirLock
from trainer.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.usefixtures('one_thread')


def logged_epochs(output_dir):
    return [json.loads(line)['epoch'] for line in (output_dir / 'log.txt').read_text().splitlines()]


HOLD_LOCK = """
import sys, time
from trainer.output_dir import OutputDirLock
OutputDirLock(sys.argv[1]).acquire()
print('held', flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_not(image_folder, tmp_path, capsys):
    holder = popen(['-c', HOLD_LOCK, tmp_path])
    try:
        assert holder.stdout.readline().strip() == 'held'
        err = error_of(tiny_args(image_folder, tmp_path, '--epochs', '1'), capsys)
        assert f'is in use by process {holder.pid} on host ' in err and 'choose another --output-dir' in err
        assert sorted(os.listdir(tmp_path)) == [LOCK_NAME]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.communicate()
    assert (tmp_path / LOCK_NAME).read_text().split()[1] == str(holder.pid)  # the killed holder left its file
    lock = OutputDirLock(str(tmp_path))
    lock.acquire()  # ... which does not block the next run
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def signal_on_training_step(monkeypatch, step, signum=signal.SIGTERM):
    """Make the trainer signal itself during its `step`-th training step (counted from 1 over the run)."""
    build = main.build_criterion

    def build_signalling(*args, **kwargs):
        criterion = build(*args, **kwargs)
        forward, calls = criterion.forward, itertools.count(1)

        def signalling_forward(*inputs):
            if next(calls) == step:
                os.kill(os.getpid(), signum)
            return forward(*inputs)

        criterion.forward = signalling_forward
        return criterion

    monkeypatch.setattr(main, 'build_criterion', build_signalling)


def test_sigterm_on_the_last_step_still_evaluates_logs_and_saves(image_folder, tmp_path, monkeypatch, capsys):
    command = tiny_args(image_folder, tmp_path, '--epochs', '2')
    signal_on_training_step(monkeypatch, 6)  # the last of epoch 0's 6 steps
    assert run_trainer(command) == PREEMPTED_EXIT_CODE
    out = capsys.readouterr()
    assert 'Accuracy of the network on the 6 test images' in out.out
    assert 'stopped after epoch 0; checkpoint saved' in out.err
    assert logged_epochs(tmp_path) == [0]
    checkpoint, best = load(tmp_path / 'checkpoint.pth'), load(tmp_path / 'best_checkpoint.pth')
    assert checkpoint['epoch'] == best['epoch'] == 0 and checkpoint['step_in_epoch'] == 0
    assert checkpoint['max_accuracy'] == json.loads((tmp_path / 'log.txt').read_text())['test_acc1']

    monkeypatch.undo()
    assert run_trainer(command) == 0
    assert 'resuming' in capsys.readouterr().out and logged_epochs(tmp_path) == [0, 1]


class Crash(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def test_a_kill_during_the_evaluation_after_a_stop_keeps_the_epochs_training(image_folder, tmp_path, monkeypatch,
                                                                            capsys):
    # A scheduler's SIGKILL may follow its SIGTERM before a long evaluation ends: the trained epoch is saved
    # first, and the resumed run only evaluates, logs and commits it.
    command = tiny_args(image_folder, tmp_path, '--epochs', '2', '--print-freq', '1')
    signal_on_training_step(monkeypatch, 6)

    def killed(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(main, 'evaluate', killed)
    with pytest.raises(Crash):
        run_trainer(command)
    pending = load(tmp_path / 'checkpoint.pth')
    assert pending['epoch'] == -1 and pending['step_in_epoch'] == 6 and pending['train_stats']['loss'] > 0
    monkeypatch.undo()
    capsys.readouterr()
    assert run_trainer(command) == 0
    out = capsys.readouterr().out
    assert 'Epoch: [0]' not in out and 'Epoch: [1]  [5/6]' in out  # epoch 0 was not trained again
    records = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1] and records[0]['train_loss'] == pending['train_stats']['loss']


@pytest.mark.parametrize('last_write', ['log.txt', 'checkpoint.pth'])
def test_a_crash_at_an_epochs_end_is_redone_on_resume(image_folder, tmp_path, monkeypatch, last_write):
    # The run dies right after writing `last_write` at the end of epoch 1: whatever was written, the same
    # command must leave one log line per epoch and a best checkpoint of the best logged epoch.
    command = tiny_args(image_folder, tmp_path, '--epochs', '2')
    replace, writes = os.replace, itertools.count(1)

    def crash_on_second_write(src, dst):
        replace(src, dst)
        if os.path.basename(dst) == last_write and next(writes) == 2:
            raise Crash

    monkeypatch.setattr(os, 'replace', crash_on_second_write)
    with pytest.raises(Crash):
        run_trainer(command)
    monkeypatch.undo()
    assert run_trainer(command) == 0
    records = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1]
    accuracies = [r['test_acc1'] for r in records]
    best = load(tmp_path / 'best_checkpoint.pth')
    assert best['epoch'] == accuracies.index(max(accuracies)) and best['max_accuracy'] == max(accuracies)
    assert load(tmp_path / 'checkpoint.pth')['epoch'] == 1


@pytest.mark.parametrize('rename, expected', [
    ('zebra', 'missing from val: stripes; only in val: zebra'),
    (None, 'the training set has 3 classes and the validation set 2, not the same (missing from val: stripes)'),
])
def test_train_and_val_class_folders_must_agree(tmp_path, capsys, rename, expected):
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1)
    stripes = tmp_path / 'data' / 'val' / 'stripes'
    if rename:
        stripes.rename(stripes.parent / rename)
    else:
        shutil.rmtree(stripes)
    err = error_of(tiny_args(data, tmp_path / 'out', '--epochs', '1'), capsys)
    assert expected in err and 'one folder for each class' in err


def cosine_lr(step, total_steps, lr, min_lr):
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * step / total_steps)) / 2


def test_a_resumed_run_takes_lr_and_epochs_from_the_command_line(image_folder, tmp_path, capsys):
    common = ['--unscale-lr', '--warmup-epochs', '0', '--print-freq', '1']
    assert run_trainer(tiny_args(image_folder, tmp_path, *common, '--epochs', '1', '--lr', '1e-3',
                                 '--min-lr', '1e-5')) == 0
    capsys.readouterr()
    # as after a divergence: a lower --lr, and more epochs, in the same output dir
    assert run_trainer(tiny_args(image_folder, tmp_path, *common, '--epochs', '3', '--lr', '4e-4',
                                 '--min-lr', '1e-4')) == 0
    out = capsys.readouterr().out
    # the schedule now spans 3 epochs of 6 steps; the first resumed step is global step 6
    first = float(re.search(r'Epoch: \[1\]  \[0/6\].*?lr: ([\d.]+)', out).group(1))
    assert first == pytest.approx(cosine_lr(6, 18, 4e-4, 1e-4), abs=1e-6)
    last = load(tmp_path / 'checkpoint.pth')['optimizer']['param_groups']
    assert all(group['lr'] == pytest.approx(cosine_lr(17, 18, 4e-4, 1e-4), rel=1e-9) for group in last)


def child_pids(pid):
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        return [int(p) for p in f.read().split()]


def rank_of(pid):
    with open(f'/proc/{pid}/environ', 'rb') as f:
        env = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
    return int(env.get(b'RANK', b'-1'))


def test_a_frozen_rank_ends_the_job_within_the_timeout(image_folder, tmp_path):
    timeout = 10
    proc = popen_any(['bash', 'scripts/pt-vim-t.sh', '--gpus', '2',
                      *tiny_args(image_folder, tmp_path, '--epochs', '50', '--batch-size', '2', '--print-freq', '1',
                                 '--compile', 'none', '--dist-timeout', str(timeout))])
    try:
        for line in proc.stdout:
            if line.startswith('Epoch: [0]  [2/6]'):  # 24 images, 2 processes x 2 per step
                break
        frozen = next(pid for pid in child_pids(proc.pid) if rank_of(pid) == 1)
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.time()
        _, stderr = proc.communicate(timeout=timeout + 90)
        # the waiting process fails after the timeout; torchrun then gives the frozen one 30 s to end after
        # SIGTERM before it kills it (a margin for a loaded machine on top)
        assert time.time() - stopped_at < timeout + 30 + 25
        assert proc.returncode != 0
        assert f'did not answer within --dist-timeout {timeout} s' in stderr, stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_sigterm_during_start_up_exits_75(image_folder, tmp_path):
    proc = popen(['main.py', *tiny_args(image_folder, tmp_path, '--epochs', '1')])
    proc.stdout.readline()  # the first line: the model and device, before the data is read
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr
    assert 'stopped by SIGTERM; nothing was lost since the last save' in stderr
    assert not (tmp_path / 'checkpoint.pth').exists()


def test_ctrl_c_saves_like_sigterm(image_folder, tmp_path):
    # Ctrl-C reaches the whole foreground process group, the loader worker included.
    proc = popen(['main.py', *tiny_args(image_folder, tmp_path, '--epochs', '1', '--num-workers', '1',
                                        '--print-freq', '1', '--batch-size', '2')])
    for line in proc.stdout:
        if line.startswith('Epoch: [0]  [ 2/12]'):
            os.killpg(proc.pid, signal.SIGINT)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr
    assert 'checkpoint saved, rerun the same command to continue' in stderr
    assert 0 < load(tmp_path / 'checkpoint.pth')['step_in_epoch'] < 12


def test_a_killed_loader_worker_is_one_line(image_folder, tmp_path):
    proc = popen(['main.py', *tiny_args(image_folder, tmp_path, '--epochs', '3', '--num-workers', '1',
                                        '--print-freq', '1', '--batch-size', '2')])
    for line in proc.stdout:
        if line.startswith('Epoch: [0]  [ 2/12]'):
            for pid in child_pids(proc.pid):
                os.kill(pid, signal.SIGKILL)  # as the kernel's out-of-memory killer does
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert stderr.startswith('error: data-loader worker ') and len(stderr.strip().splitlines()) == 1, stderr
    assert 'lack of memory: lower --num-workers' in stderr


@pytest.mark.parametrize('flags, expected', [
    (['--lr=-1e-3'], '--lr -0.001: must be at least 0'),
    (['--num-workers', '-2'], '--num-workers -2: must be at least 0'),
    (['--epochs', '0'], '--epochs 0: must be at least 1'),
])
def test_out_of_range_numbers(image_folder, tmp_path, capsys, flags, expected):
    assert expected in error_of(tiny_args(image_folder, tmp_path, *flags), capsys)


def test_output_dir_that_is_a_file(image_folder, tmp_path, capsys):
    (tmp_path / 'out').write_text('')
    err = error_of(tiny_args(image_folder, tmp_path / 'out', '--epochs', '1'), capsys)
    assert f'--output-dir {tmp_path / "out"} is a file, not a directory' in err


def test_read_only_output_dir_stops_before_training(image_folder, tmp_path, capsys, monkeypatch):
    # (the tests may run as root, whom permissions do not stop: the file system's answer is simulated)
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(trainer.output_dir, 'open', read_only, raising=False)
    assert run_trainer(tiny_args(image_folder, tmp_path, '--epochs', '1')) == 2
    out, err = capsys.readouterr()
    assert err == f'error: cannot write {tmp_path} (Read-only file system): make --output-dir writable or choose ' \
                  f'another, then rerun\n'
    assert out == ''  # stopped before reading the data, let alone training


def test_full_disk_on_save(image_folder, tmp_path, capsys, monkeypatch):
    def no_space(obj, f):
        f.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', no_space)
    err = error_of(tiny_args(image_folder, tmp_path, '--epochs', '1'), capsys)
    assert f'no space left on the device writing {tmp_path}' in err and 'free some space' in err
    assert not [name for name in os.listdir(tmp_path) if name.endswith('.tmp')]


def test_image_smaller_than_the_crop_trains(tmp_path, capsys):
    """An 8x8 image in a run at a 16 px input: padded by the small-input crop, not a crash."""
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1)
    Image.new('RGB', (8, 8)).save(tmp_path / 'data' / 'train' / 'square' / 'small.png')
    assert run_trainer(tiny_args(data, tmp_path / 'out', '--epochs', '1', '--no-repeated-aug')) == 0


def test_image_a_transform_cannot_take_is_named(tmp_path):
    path = tmp_path / 'odd.png'
    Image.new('RGB', (8, 8)).save(path)

    class Files(list):
        def filename(self, index):
            return self[index][0]

    def refuse(image):
        raise ValueError('crop larger than the image')

    with pytest.raises(UserError, match=f'cannot use image {path} .*crop larger than the image.*replace or delete'):
        ImageSource(Files([(str(path), 0)]), refuse)[0]


class NotATensor:
    def __reduce__(self):
        return (print, ('this must not run',))


@pytest.mark.parametrize('content, expected', [
    ('tensor', 'holds a Tensor, not a checkpoint'),
    ('directory', 'is a directory: give the checkpoint file in it'),
    ('pickle', 'holds Python objects other than tensors and plain data, which are refused'),
])
def test_unusable_checkpoints(image_folder, tmp_path, capsys, content, expected):
    path = tmp_path / 'given'
    if content == 'tensor':
        torch.save(torch.zeros(3), path)
    elif content == 'directory':
        path.mkdir()
    else:
        torch.save({'model': NotATensor()}, path)
    err = error_of(tiny_args(image_folder, tmp_path / 'out', '--eval', '--resume', path), capsys)
    assert expected in err and 'weights_only' not in err and 'this must not run' not in capsys.readouterr().out


def test_resuming_with_another_optimizer(image_folder, tmp_path, capsys):
    model = tiny_model()
    args = main.get_args_parser().parse_args(['--opt', 'adamw'])
    optimizer = main.build_optimizer(model, args, lr=1e-3)
    path = tmp_path / 'adamw.pth'
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 0,
                'args': {'opt': 'adamw'}}, path)
    err = error_of(tiny_args(image_folder, tmp_path / 'out', '--epochs', '2', '--opt', 'sgd', '--resume', path), capsys)
    assert f'{path} was trained with --opt adamw, not --opt sgd: resume with --opt adamw' in err


def test_eval_without_a_checkpoint_is_refused_unless_asked(image_folder, tmp_path, capsys):
    err = error_of(tiny_args(image_folder, tmp_path, '--eval'), capsys)
    assert '--eval without a checkpoint would evaluate untrained weights' in err and '--eval-untrained' in err
    assert run_trainer(tiny_args(image_folder, tmp_path, '--eval', '--eval-untrained')) == 0
    assert 'Accuracy of the network on the 6 test images' in capsys.readouterr().out
