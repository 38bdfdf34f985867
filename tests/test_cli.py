"""main.py's command line: both spellings of every flag, one-line errors with the closest flag, and error
texts that name only flags the parser has."""
import ast
import glob
import os
import re
import subprocess

import pytest

import main
import trainer.distributed
from trainer import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = re.compile(r'--[a-z][a-z0-9_-]*[a-z0-9]')


def parse(*argv):
    return main.get_args_parser().parse_args(list(argv))


def parser_flags():
    return {s for action in main.get_args_parser()._actions for s in action.option_strings}


def test_every_flag_has_both_spellings():
    for action in main.get_args_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith('--'):
                name = flag[2:]
                assert {'--' + name.replace('_', '-'), '--' + name.replace('-', '_')} <= set(action.option_strings)


def test_underscore_and_hyphen_spellings_parse_alike():
    hyphen = parse('--num-workers', '3', '--data-path', 'd', '--output-dir', 'o', '--start-epoch', '2', '--if-amp',
                   '--model-kwargs', 'depth=2', '--batch-size=8')
    underscore = parse('--num_workers', '3', '--data_path', 'd', '--output_dir', 'o', '--start_epoch', '2', '--if_amp',
                       '--model_kwargs', 'depth=2', '--batch_size=8')
    assert vars(hyphen) == vars(underscore)
    assert (hyphen.num_workers, hyphen.data_path, hyphen.output_dir, hyphen.start_epoch, hyphen.if_amp,
            hyphen.batch_size) == (3, 'd', 'o', 2, True, 8)


def test_help_lists_one_spelling_and_no_measurements():
    text = main.get_args_parser().format_help()
    assert '--num-workers' in text and '--output-dir' in text
    listed = set(FLAG.findall(text.split('options:')[1]))
    assert not {f for f in listed if '_' in f} - {'--num_workers'}  # the description's example only
    assert not re.search(r'\d(\.\d+)?x faster|\bv\d+\b|H100|H200', text)


def error_line(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1, err
    return err


def test_misspelled_flag_is_one_line_naming_the_closest(capsys):
    assert 'unknown flag --bach-size: did you mean --batch-size?' in error_line(capsys, '--bach-size', '8')
    assert 'did you mean --num-workers?' in error_line(capsys, '--num_wrkers=2')
    assert 'argument --model-kwargs: expected key=value' in error_line(capsys, '--model-kwargs', 'depth')


@pytest.mark.parametrize('flag', ['--resplit', '--world_size', '--world-size'])
def test_removed_dead_flags_are_rejected(capsys, flag):
    assert f'unknown flag {flag}' in error_line(capsys, flag, *(['4'] if 'world' in flag else []))


def test_local_rank_flag_picks_the_device_when_the_launcher_sets_no_variable(monkeypatch):
    calls = []
    monkeypatch.setattr(trainer.distributed.dist, 'init_process_group', lambda **kw: calls.append(kw))
    monkeypatch.setattr(trainer.distributed.dist, 'barrier', lambda: None)
    for name in ('LOCAL_RANK', 'SLURM_NTASKS', 'SLURM_PROCID'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '2')
    args = parse('--local-rank=1', '--device', 'cpu')  # as torch.distributed.launch passes it
    trainer.distributed.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (True, 1, 2, 1)
    assert calls[0]['world_size'] == 2 and calls[0]['rank'] == 1
    monkeypatch.setenv('LOCAL_RANK', '0')  # torchrun's variable wins
    trainer.distributed.init_distributed_mode(args)
    assert args.gpu == 0


def string_literals(path):
    """Every string literal of a file, the constant parts of f-strings included, minus docstrings."""
    tree = ast.parse(open(path).read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr)}
    defined = {arg.value for node in ast.walk(tree) if isinstance(node, ast.Call)
               and getattr(node.func, 'attr', '') == 'add_argument' for arg in node.args
               if isinstance(arg, ast.Constant)}
    texts = [node.value for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]
    return texts, defined


def test_error_texts_name_only_existing_flags():
    known = parser_flags()
    files = [os.path.join(REPO, f) for f in ('main.py', 'datasets.py', 'engine.py')]
    files += glob.glob(os.path.join(REPO, 'trainer', '*.py'))
    checked = set()
    for path in files:
        texts, own_flags = string_literals(path)  # a file's own parser (datasets.py --export-digits)
        for text in texts:
            for flag in FLAG.findall(text):
                assert flag in known | own_flags, f'{os.path.basename(path)}: {flag} in {text!r}'
                checked.add(flag)
    assert {'--batch-size', '--model-kwargs', '--data-path', '--teacher-path', '--no-amp'} <= checked


def test_model_kwargs_that_are_not_literals_are_named():
    with pytest.raises(UserError) as err:
        main.create_model('vim_tiny_patch16_224', [('depth', 'four'), ('embed_dim', 32)], img_size=32)
    message = str(err.value)
    assert '--model-kwargs depth=four: not a Python literal' in message and 'embed_dim' not in message
    assert '\n' not in message
    with pytest.raises(UserError, match='--model vim_tiny_patch16_224 has no argument colour: drop it'):
        main.create_model('vim_tiny_patch16_224', [('colour', 'red')], img_size=32)


def test_launcher_recognises_flags_in_either_spelling(tmp_path):
    # A stand-in torchrun that prints the arguments main.py would get.
    (tmp_path / 'torchrun').write_text('#!/bin/sh\nshift 3\necho "$@"\n')
    (tmp_path / 'torchrun').chmod(0o755)
    env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}', DATA_PATH='/env/data')
    out = subprocess.run(['bash', 'scripts/pt-vim-t.sh', '--gpus', '1', '--output_dir', 'mine', '--data_path=x'],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    assert out.count('--output') == 1 and '--output_dir mine' in out
    assert '/env/data' not in out and '--data_path=x' in out
