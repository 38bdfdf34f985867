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
