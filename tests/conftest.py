import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and spinning OpenMP threads slow down many-fold on
    a shared machine (the trainer subprocesses get OMP_NUM_THREADS=1 as well: same float rounding).
    Used by the modules that opt in with pytestmark; not autouse, so tests/gpu keeps all threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    # The marks timm's vendored model tests (tests/timm_suite) group themselves by; `timeout` is
    # pytest-timeout's, honoured where that plugin is installed.
    for mark in ("base", "cfg", "cfg_nonstd", "features", "forward", "backward", "fxforward", "fxbackward",
                 "torchscript", "timeout"):
        config.addinivalue_line("markers", f"{mark}: a group of timm's model tests")
