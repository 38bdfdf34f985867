"""Preemption, kills while saving, non-finite steps, and one-line errors for bad input."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_trainer import REPO, TINY_MODEL, load, make_image_folder, run_trainer, tiny_args, tiny_model
from trainer.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    # 16 images per class, batch 2: 24 steps per epoch, long enough to stop in the middle
    return make_image_folder(tmp_path_factory.mktemp('images'), per_class=16)


def popen_any(argv):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen([str(a) for a in argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def popen(argv):
    return popen_any([sys.executable, *argv])


# SIGTERM to the trainer alone (torchrun forwards it so); SIGUSR1 to the whole process group, loader
# workers included (as SLURM may send its warning signal), whose augmentations must not depend on the
# worker.
@pytest.mark.parametrize('signum, workers, whole_group', [(signal.SIGTERM, '0', False), (signal.SIGUSR1, '2', True)])
def test_signal_mid_epoch_then_restart_equals_uninterrupted(image_folder, tmp_path, signum, workers, whole_group):
    common = ['--epochs', '2', '--batch-size', '2', '--print-freq', '1', '--drop-path', '0.1',
              '--model-ema-decay', '0.9', '--warmup-epochs', '1']
    straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
    # the uninterrupted run in a fresh process too, so that no state left by earlier tests can differ
    proc = popen(['main.py', *tiny_args(image_folder, straight, *common)])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr

    proc = popen(['main.py', *tiny_args(image_folder, stopped, *common, '--num-workers', workers)])
    for line in proc.stdout:
        if line.startswith('Epoch: [0]  [ 2/24]'):
            os.killpg(proc.pid, signum) if whole_group else proc.send_signal(signum)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr
    assert 'rerun the same command to continue' in stderr
    checkpoint = load(stopped / 'checkpoint.pth')
    assert checkpoint['epoch'] == -1 and 0 < checkpoint['step_in_epoch'] < 24  # stopped inside epoch 0

    proc = popen(['main.py', *tiny_args(image_folder, stopped, *common, '--num-workers', workers)])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f'step {checkpoint["step_in_epoch"]}' in stdout.split('resuming', 1)[1].splitlines()[0]
    a, b = load(straight / 'checkpoint.pth'), load(stopped / 'checkpoint.pth')
    for part in ('model', 'model_ema'):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


SAVE_LOOP = """
import sys, torch
from trainer.checkpoint import save_atomic
path, start = sys.argv[1], int(sys.argv[2])
for i in range(start, 10 ** 9):
    # ~24 MB per file, every tensor filled with the iteration number
    save_atomic({'i': i, 'model': {f'w{k}': torch.full((1000, 1000), float(i)) for k in range(6)}}, path)
    print(i, flush=True)
"""


def test_sigkill_while_saving_never_leaves_an_unloadable_checkpoint(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    rng = random.Random(0)
    last_seen = -1
    for _ in range(4):
        proc = popen(['-c', SAVE_LOOP, str(path), str(last_seen + 1)])
        proc.stdout.readline()  # at least one complete save
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.communicate()
        checkpoint = load(path)
        i = checkpoint['i']
        assert i > last_seen  # this process completed at least one save before it was killed
        last_seen = i
        assert all(torch.all(t == float(i)) for t in checkpoint['model'].values())


def test_non_finite_steps_are_skipped_and_counted_then_stop(image_folder, tmp_path, capsys):
    # A learning rate of 1e30 sends the weights to huge values after one step: the following losses
    # are not finite. Those steps must leave the weights untouched, and the run must stop after 3.
    args = tiny_args(image_folder, tmp_path, '--epochs', '1', '--lr', '1e30', '--unscale-lr', '--warmup-epochs', '0',
                     '--max-nonfinite-steps', '3', '--no-model-ema', '--opt', 'sgd', '--weight-decay', '0',
                     '--save-every-steps', '1')
    assert run_trainer(args) == 3
    err = capsys.readouterr().err
    assert err.startswith('error: 3 consecutive steps up to step ') and 'non-finite' in err
    assert len(err.strip().splitlines()) == 1
    checkpoint = load(tmp_path / 'checkpoint.pth')
    assert all(torch.isfinite(v).all() for v in checkpoint['model'].values())

    assert run_trainer([*args, '--if-continue-inf', '--output-dir', tmp_path / 'continue']) == 0
    log = (tmp_path / 'continue' / 'log.txt').read_text()
    assert '"train_skipped_steps": ' in log and '"train_skipped_steps": 0' not in log
    checkpoint = load(tmp_path / 'continue' / 'checkpoint.pth')
    assert all(torch.isfinite(v).all() for v in checkpoint['model'].values())


def error_of(argv, capsys):
    """Run the trainer; return its stderr after checking it is one `error:` line and exit code 2."""
    assert run_trainer(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and len(err.splitlines()) == 1, err
    return err


def test_corrupt_image_is_named(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1)
    bad = tmp_path / 'data' / 'train' / 'square' / 'broken.png'
    bad.write_bytes(open(tmp_path / 'data' / 'train' / 'square' / '0.png', 'rb').read()[:60])  # truncated
    for workers in ('0', '1'):  # read in the main process, and reported from a loader worker
        err = error_of(tiny_args(data, tmp_path / 'out', '--epochs', '1', '--no-repeated-aug', '--strict-images',
                                 '--num-workers', workers), capsys)
        assert f'e.g. {bad}: OSError' in err and 'fix or delete them' in err


def test_empty_class_folder(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=2, val_per_class=1)
    os.makedirs(tmp_path / 'data' / 'val' / 'zebra')
    err = error_of(tiny_args(data, tmp_path / 'out', '--epochs', '1'), capsys)
    assert 'class folder(s) zebra in' in err and 'hold no images' in err


def test_missing_data_path(tmp_path, capsys):
    err = error_of(tiny_args(str(tmp_path / 'nowhere'), tmp_path / 'out'), capsys)
    assert f'data folder {tmp_path / "nowhere" / "train"} does not exist' in err


def test_unknown_model_lists_close_names(image_folder, tmp_path, capsys):
    argv = tiny_args(image_folder, tmp_path)
    argv[argv.index('vim_tiny_patch16_224')] = 'vim_tiny_patch16_244'
    err = error_of(argv, capsys)
    assert 'unknown --model vim_tiny_patch16_244' in err and 'vim_tiny_patch16_224' in err


def test_checkpoint_of_another_model(image_folder, tmp_path, capsys):
    other = tiny_model(embed_dim=48)
    torch.save({'model': other.state_dict()}, tmp_path / 'other.pth')
    err = error_of(tiny_args(image_folder, tmp_path / 'out', '--eval', '--resume', tmp_path / 'other.pth'), capsys)
    assert 'does not fit --model vim_tiny_patch16_224' in err
    assert 'cls_token (1, 1, 48) vs (1, 1, 32)' in err


def test_truncated_checkpoint(image_folder, tmp_path, capsys):
    torch.save({'model': tiny_model().state_dict()}, tmp_path / 'good.pth')
    (tmp_path / 'bad.pth').write_bytes((tmp_path / 'good.pth').read_bytes()[:1000])
    err = error_of(tiny_args(image_folder, tmp_path / 'out', '--eval', '--resume', tmp_path / 'bad.pth'), capsys)
    assert f'cannot load checkpoint {tmp_path / "bad.pth"}' in err


def test_input_size_the_model_cannot_take(image_folder, tmp_path, capsys):
    argv = tiny_args(image_folder, tmp_path)
    argv[argv.index('--input-size') + 1] = '40'
    err = error_of(argv, capsys)
    assert '--input-size 40 does not fit' in err and 'patch 16, stride 16' in err
    assert 'e.g. --input-size 32 or 48' in err


def test_batch_too_large_for_the_data(image_folder, tmp_path, capsys):
    err = error_of(tiny_args(image_folder, tmp_path, '--batch-size', '64'), capsys)
    assert 'too few for one batch of --batch-size 64 on 1 process(es)' in err


def test_odd_batch_with_mixup(image_folder, tmp_path, capsys):
    err = error_of(tiny_args(image_folder, tmp_path, '--batch-size', '3'), capsys)
    assert '--batch-size 3 is odd' in err


def test_tf32_without_cuda(image_folder, tmp_path, capsys):
    err = error_of(tiny_args(image_folder, tmp_path, '--fp32-matmul', 'tf32'), capsys)
    assert '--fp32-matmul tf32 selects CUDA tensor cores; it does nothing on --device cpu' in err


def test_no_traceback_for_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        run_trainer([*TINY_MODEL, '--data-set', 'IMAGENET22K'])
    assert exc.value.code == 2
    assert 'unknown --data-set IMAGENET22K: choose one of IMNET, folder' in capsys.readouterr().err


def test_torchrun_job_stopped_by_sigterm_resumes_exactly(image_folder, tmp_path):
    # torchrun forwards SIGTERM to both processes: they agree on the step, save together and exit;
    # restarted, the pair continues as if never stopped. 48 images, 2 x 2 per step: 12 steps per epoch.
    launch = ['bash', 'scripts/pt-vim-t.sh', '--gpus', '2']
    common = ['--epochs', '1', '--batch-size', '2', '--print-freq', '1', '--model-ema-decay', '0.9',
              '--warmup-epochs', '1', '--compile', 'none']  # the recipe compiles; not worth minutes on a CPU
    straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
    proc = popen_any([*launch, *tiny_args(image_folder, straight, *common)])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr

    proc = popen_any([*launch, *tiny_args(image_folder, stopped, *common)])
    for line in proc.stdout:
        if line.startswith('Epoch: [0]  [ 2/12]'):
            proc.send_signal(signal.SIGTERM)  # the launcher exec'ed torchrun: this is torchrun
            break
    proc.communicate(timeout=120)
    checkpoint = load(stopped / 'checkpoint.pth')
    assert checkpoint['epoch'] == -1 and 0 < checkpoint['step_in_epoch'] < 12
    assert len(checkpoint['rng_state']) == 2

    proc = popen_any([*launch, *tiny_args(image_folder, stopped, *common)])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    a, b = load(straight / 'checkpoint.pth'), load(stopped / 'checkpoint.pth')
    for part in ('model', 'model_ema'):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
