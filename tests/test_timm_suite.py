"""timm's own model tests (tests/timm_suite, vendored from the timm release) over every Vim model name.

Vim is run through exactly the tests timm runs for its ViT (`REFERENCE_MODEL`): a test function whose
model_name parametrization includes that ViT runs here for every Vim name, with the same other parameters.
A newer timm whose tests or model API break Vim fails here; an older timm than the vendored suite skips
(its API may lack what the suite checks).
"""
import os

import pytest
from packaging.version import Version

import timm
import vim  # registers the Vim models before the suite's module-level list_models() calls
from timm_suite import VENDORED_TIMM_VERSION

if Version(timm.__version__) < Version(VENDORED_TIMM_VERSION):
    pytest.skip(f"the vendored timm test suite is timm {VENDORED_TIMM_VERSION}'s; installed timm "
                f"{timm.__version__} is older", allow_module_level=True)

from timm_suite import timm_test_models as suite  # noqa: E402
from timm_suite.timm_test_models import cfg_device  # noqa: E402,F401  (a fixture some suite tests take)

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


def test_suite_runs_the_reference_models_tests():
    # The tests timm runs for ViT, among them the non-standard-model ones, FX and the backward through FX.
    selected = {name for name, _ in REFERENCE_TESTS}
    assert {"test_model_forward", "test_model_backward", "test_model_default_cfgs_non_std",
            "test_model_forward_intermediates", "test_model_forward_intermediates_features",
            "test_prune_intermediate_layers_contract", "test_model_forward_fx",
            "test_model_backward_fx"} <= selected, selected
    assert len(VIM_NAMES) == 10, VIM_NAMES


def _skip_reason(test_name, model_name):
    if "torchscript" in test_name:
        return ("TorchScript is not supported (deprecated in torch): the mamba_ssm mixer and the kernel "
                "dispatch are not scriptable; use torch.compile or torch.export")
    if test_name == "test_model_load_pretrained":
        from huggingface_hub import try_to_load_from_cache
        from vim.models_mamba import ALIASES, _ARCHS

        repo, filename = _ARCHS[ALIASES.get(model_name, model_name)][1]
        if not isinstance(try_to_load_from_cache(repo, filename), str):
            return f"needs the released checkpoint {repo}/{filename} in the Hugging Face cache"
    if test_name == "test_prune_intermediate_layers_contract" and not os.environ.get("VIM_TIMM_SUITE_SLOW"):
        # timm's own CI leaves it out too ("slow, prunes every model at every feature index").
        return "prunes at each of the 24 blocks (minutes per model on 2 cores): set VIM_TIMM_SUITE_SLOW=1"
    return None


@pytest.mark.parametrize("model_name", VIM_NAMES)
@pytest.mark.parametrize("test_name,kwargs", REFERENCE_TESTS, ids=[name for name, _ in REFERENCE_TESTS])
def test_timm_suite(test_name, kwargs, model_name, request):
    reason = _skip_reason(test_name, model_name)
    if reason:
        pytest.skip(reason)
    func = getattr(suite, test_name)
    if "cfg_device" in func.__code__.co_varnames[:func.__code__.co_argcount]:
        kwargs = dict(kwargs, cfg_device=request.getfixturevalue("cfg_device"))
    func(model_name=model_name, **kwargs)
