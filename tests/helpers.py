"""Helpers shared by the CPU test modules."""
import importlib


def extension_importable(module):
    """Whether a compiled extension imports here: checked independently of the packages' own
    available(), which is code under test."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def assert_max_error(actual, expected, rtol, atol, what=""):
    """max |actual - expected| <= atol + rtol * max |expected| (computed in float64)."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= atol + rtol * scale, f"{what}: max error {err:.3e} (scale {scale:.3e})"
