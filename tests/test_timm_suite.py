"""timm's own model tests (tests/timm_suite, vendored from the timm release) over every Vim model name.

Vim is run through exactly the tests timm runs for its ViT (`REFERENCE_MODEL`): a test function whose
model_name parametrization includes that ViT runs here for every Vim name, with the same other parameters.
A newer timm whose tests or model API break Vim fails here; an older timm than the vendored suite skips
(its API may lack what the suite checks). The pretrained-weight tests load checkpoints written into a temporary
Hugging Face cache (no network here or in CI).
"""
import pytest
import torch
from packaging.version import Version

import timm
import vim  # registers the Vim models before the suite's module-level list_models() calls
from helpers import put_in_hf_cache
from test_vim_model import save_trainer_checkpoint
from timm_suite import VENDORED_TIMM_VERSION
from vim.models_mamba import ALIASES, _ARCHS

if Version(timm.__version__) < Version(VENDORED_TIMM_VERSION):
    pytest.skip(f"the vendored timm test suite is timm {VENDORED_TIMM_VERSION}'s; installed timm "
                f"{timm.__version__} is older", allow_module_level=True)

from timm_suite import timm_test_models as suite  # noqa: E402
from timm_suite.timm_test_models import cfg_device  # noqa: E402,F401  (a fixture some suite tests take)

pytestmark = pytest.mark.usefixtures("one_thread")
REFERENCE_MODEL = "vit_tiny_patch16_224"
VIM_NAMES = sorted(timm.list_models("vim*"))


def _model_name_params(func):
    """The parametrize marks of one suite test: (model names, {other argument: values})."""
    names, others = None, {}
    for mark in getattr(func, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        argnames, values = mark.args[0], list(mark.args[1])
        if argnames == "model_name":
            names = values
        elif "," not in argnames:
            others[argnames] = values
    return names, others


def _reference_tests():
    cases = []
    for test_name, func in sorted(vars(suite).items()):
        if not (test_name.startswith("test_") and callable(func)):
            continue
        names, others = _model_name_params(func)
        # Tests over tagged names (name.pretrained_tag) run once per architecture here.
        if names is None or REFERENCE_MODEL not in {name.split(".")[0] for name in names}:
            continue
        if len(others) > 1 or any(len(values) != 1 for values in others.values()):
            raise AssertionError(f"{test_name}: parametrization beyond one batch size; extend this adapter")
        cases.append((test_name, {key: values[0] for key, values in others.items()}))
    return cases


REFERENCE_TESTS = _reference_tests()
CHECKPOINT_SEED = 20260  # not the seed the tests build models under: loaded weights must be the file's


@pytest.fixture(scope="session")
def released_checkpoints_cache(tmp_path_factory):
    """A Hugging Face cache holding each released checkpoint under its repo id and file name, in the original
    trainer's format ({'model': state_dict, 'args': Namespace, ...}), with random weights of our model: the
    suite's pretrained tests then run offline (no network here or in CI), through the same cache lookup a
    user's download would take."""
    cache = tmp_path_factory.mktemp("hf_hub_cache")
    for offset, (name, (_, (repo, filename))) in enumerate(_ARCHS.items()):
        with torch.random.fork_rng():
            torch.manual_seed(CHECKPOINT_SEED + offset)  # another seed per architecture: no two files alike
            state = timm.create_model(name).state_dict()
        put_in_hf_cache(cache, repo, filename, lambda path: save_trainer_checkpoint(path, state))
    return cache


@pytest.fixture
def offline_hub(released_checkpoints_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(released_checkpoints_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these variables once, when it is imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(released_checkpoints_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return released_checkpoints_cache


def test_suite_runs_the_reference_models_tests():
    # The tests timm runs for ViT, among them the non-standard-model ones, FX and the backward through FX.
    selected = {name for name, _ in REFERENCE_TESTS}
    assert {"test_model_forward", "test_model_backward", "test_model_default_cfgs_non_std",
            "test_model_forward_intermediates", "test_model_forward_intermediates_features",
            "test_prune_intermediate_layers_contract", "test_model_forward_fx",
            "test_model_backward_fx"} <= selected, selected
    assert len(VIM_NAMES) == 10, VIM_NAMES


@pytest.mark.parametrize("model_name", VIM_NAMES)
@pytest.mark.parametrize("test_name,kwargs", REFERENCE_TESTS, ids=[name for name, _ in REFERENCE_TESTS])
def test_timm_suite(test_name, kwargs, model_name, request):
    if "torchscript" in test_name:  # the one exclusion, documented in the README
        pytest.skip("TorchScript is not supported (deprecated in torch): the mamba_ssm mixer and the kernel "
                    "dispatch are not scriptable; use torch.compile or torch.export")
    if "pretrained" in test_name:
        request.getfixturevalue("offline_hub")
    func = getattr(suite, test_name)
    if "cfg_device" in func.__code__.co_varnames[:func.__code__.co_argcount]:
        kwargs = dict(kwargs, cfg_device=request.getfixturevalue("cfg_device"))
    func(model_name=model_name, **kwargs)


@pytest.mark.parametrize("model_name", VIM_NAMES)
def test_pretrained_loads_the_released_file_of_its_architecture(model_name, offline_hub):
    from huggingface_hub import scan_cache_dir

    repo, filename = _ARCHS[ALIASES.get(model_name, model_name)][1]
    cached = {(r.repo_id, f.file_name) for r in scan_cache_dir(offline_hub).repos for rev in r.revisions
              for f in rev.files}
    assert (repo, filename) in cached  # the layout huggingface_hub itself reads back
    path = offline_hub / f"models--{repo.replace('/', '--')}" / "snapshots"
    written = torch.load(next(path.glob(f"*/{filename}")), weights_only=False)["model"]
    loaded = timm.create_model(model_name, pretrained=True).state_dict()
    assert loaded.keys() == written.keys()
    for key, value in written.items():
        assert torch.equal(loaded[key], value), key  # a fresh init (another seed) would differ everywhere
