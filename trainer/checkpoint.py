"""Checkpoint files: atomic writes, safe loads (original-format files included) and weight loading."""
import os
import pickle
import random
import sys
import urllib.parse

import numpy as np
import torch

from trainer import UserError
from trainer.output_dir import write_atomic
from vim import load_checkpoint


def save_atomic(obj, path):
    """torch.save `obj` to `path` so that `path` always holds a complete file (see write_atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def open_checkpoint(path):
    """Load the checkpoint file or URL given on the command line, through the model's `vim.load_checkpoint`.

    A URL is downloaded once into torch.hub's cache. A missing or unreadable file raises a UserError
    naming it; reading the file (safely, `weights_only=True`) is left to `vim.load_checkpoint`.
    """
    if path.startswith(('https://', 'http://')):
        cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urllib.parse.urlparse(path).path))
        if not os.path.isfile(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(path, cached)
        path = cached
    if os.path.isdir(path):
        raise UserError(f'checkpoint {path} is a directory: give the checkpoint file in it, e.g. '
                        f'{os.path.join(path, "checkpoint.pth")}')
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} does not exist: check the path given to --resume/--finetune/--teacher-path')
    try:
        return load_checkpoint(path)
    except pickle.UnpicklingError as err:  # torch's text advises weights_only=False, which runs any code in it
        if 'weights only load failed' not in str(err).lower():
            raise unreadable(path, err) from None
        raise UserError(f'cannot load checkpoint {path}: it holds Python objects other than tensors and plain data, '
                        f'which are refused because loading them can run arbitrary code; re-save its tensors '
                        f'(e.g. {{"model": model.state_dict()}}) where the file is trusted') from None
    except Exception as err:  # torch raises several types for unreadable files
        raise unreadable(path, err) from None


def unreadable(path, err):
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f'cannot load checkpoint {path} ({first_line}): it is truncated or not a PyTorch checkpoint')


def model_state_dict(checkpoint, source):
    """The model weights of a checkpoint dict (`{'model': sd, ...}`) or of a bare state dict."""
    if not isinstance(checkpoint, dict):
        raise UserError(f'{source} holds a {type(checkpoint).__name__}, not a checkpoint: save a dict such as '
                        f'{{"model": model.state_dict()}}')
    state_dict = checkpoint.get('model', checkpoint)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f'{source} holds no state dict under "model" nor is it one')
    return state_dict


def check_compatible(state_dict, model, model_name, source):
    """Raise a UserError naming every missing, unexpected or differently shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}'
              for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return
    problems = []
    for label, items in (('missing keys', missing), ('unexpected keys', unexpected),
                         ('shape mismatches (checkpoint vs model)', shapes)):
        if items:
            shown = ', '.join(items[:5]) + (f' and {len(items) - 5} more' if len(items) > 5 else '')
            problems.append(f'{label}: {shown}')
    raise UserError(f'{source} does not fit --model {model_name} ({"; ".join(problems)}): pass the --model it was '
                    f'trained with (and the same --input-size and --data-set, which sets the number of classes), or use --finetune to adapt it')


def load_finetune_weights(model, checkpoint, source):
    """Load pre-trained weights into a model of another resolution, stride or class count.

    The model's own `checkpoint_filter_fn` (from its timm module) resamples position embeddings; head
    weights whose shape differs are dropped and re-initialised. Returns the dropped keys.
    """
    state_dict = model_state_dict(checkpoint, source)
    filter_fn = getattr(sys.modules[type(model).__module__], 'checkpoint_filter_fn', None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    expected = model.state_dict()
    head_keys = {k for k in expected if k.split('.')[0] in ('head', 'head_dist')}
    dropped = sorted(k for k in head_keys if k in state_dict and state_dict[k].shape != expected[k].shape)
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    check_compatible({**state_dict, **{k: expected[k] for k in dropped}}, model, type(model).__name__, source)
    result = model.load_state_dict(state_dict, strict=False)
    assert sorted(result.missing_keys) == dropped and not result.unexpected_keys, result
    return dropped


def capture_rng_state():
    """Random states of this process as tensors and plain lists (loadable with weights_only=True)."""
    numpy_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': [numpy_state[0], numpy_state[1].tolist(), numpy_state[2], numpy_state[3], numpy_state[4]],
        'python': random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state['torch'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
