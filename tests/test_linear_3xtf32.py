"""CPU tests of the 3xTF32 linear: the operand split against a float64 rounding, the kernel's indexing
(layouts, masks, bias, split-K) in Triton's interpreter against float64, and when the layers use it."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mamba_ssm.ops import linear_3xtf32, policy

mm_3xtf32 = pytest.importorskip("mamba_ssm.ops.mm_3xtf32", reason="needs Triton")


def tf32_round_reference(values):
    """Round to 11 significant bits, ties away from zero, through frexp in float64."""
    out = []
    for v in values.double().tolist():
        mantissa, exponent = math.frexp(v)  # v = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
        scaled = abs(mantissa) * 2 ** 11
        out.append(math.copysign(math.floor(scaled + 0.5), v) * 2.0 ** (exponent - 11))
    return torch.tensor(out, dtype=torch.float64)


def test_split_rounds_to_tf32_to_nearest_and_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, generator=g) * 10.0 ** torch.randint(-20, 20, (2000,), generator=g),
                   torch.tensor([0.0, -0.0, 1.0, -3.0, 1 + 2 ** -11, 1 + 3 * 2 ** -12, -(2 - 2 ** -23)])])
    big, small = mm_3xtf32.split_tf32(x)
    assert torch.equal(big.double(), tf32_round_reference(x))
    assert torch.equal((big.double() + small.double()), x.double())  # the remainder is exact in fp32
    assert (small.abs() <= x.abs() * 2 ** -11).all()


INTERPRETED_CASES = [  # M, K, N, a transposed in memory, bias, multiprocessors (few: forces split-K)
    (37, 70, 29, False, True, 132),
    (37, 70, 29, True, True, 132),
    (130, 300, 66, True, False, 132),
    (20, 2100, 18, False, True, 4),
    (20, 2100, 18, True, False, 4),
]


def test_kernel_in_interpreter_matches_float64():
    """The cases run in a subprocess, since Triton reads TRITON_INTERPRET when the kernel is defined."""
    script = f"""
import json, torch
from mamba_ssm.ops import mm_3xtf32 as lin
torch.manual_seed(0)
errors = []
for M, K, N, transposed, with_bias, sms in {INTERPRETED_CASES!r}:
    a = torch.randn(K, M).t() if transposed else torch.randn(M, K)
    w = torch.randn(N, K)
    bias = torch.randn(2 * N)[::2] if with_bias else None  # strided, as a view of a larger tensor can be
    out = lin.launch(a, w.t(), bias, sms, kernel=lin._mm_kernel.fn, BLOCK_M=32, BLOCK_N=16, BLOCK_K=32)
    ref = a.double() @ w.double().t() + (bias.double() if with_bias else 0)
    errors.append([list(out.shape), ((out.double() - ref).abs().max() / ref.abs().max()).item()])
print(json.dumps(errors))
"""
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for (M, K, N, *_), (shape, err) in zip(INTERPRETED_CASES, json.loads(done.stdout.splitlines()[-1])):
        assert shape == [M, N]
        assert err < 1e-5, (M, K, N, err)


def test_cpu_layers_use_torch_linear():
    weight = torch.zeros(4, 3)
    assert not linear_3xtf32.applies(torch.zeros(2, 3), weight)  # CPU: torch's linear
    layer = torch.nn.Linear(3, 4)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(linear_3xtf32.linear(x, layer.weight, layer.bias), layer(x), rtol=0, atol=0)


def test_set_mode_rejects_unknown_modes():
    with pytest.raises(ValueError, match="fp32 matmul mode must be one of .*'3xtf32', 'ieee'.*got 'tf64'"):
        policy.set_mode("tf64")


def test_tf32_setting_is_read_through_either_torch_api():
    """The legacy flag cannot be read once the newer fp32_precision API has been used (torch 2.9+), and the
    newer one breaks torch.compile's graph; run in a subprocess, since the API state is process-wide."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch before 2.9 has only the legacy flag")
    script = """
import torch
from mamba_ssm.ops import linear_3xtf32, policy
assert linear_3xtf32.kernels is not None
assert policy.tf32_matmuls() is False
torch.backends.cuda.matmul.allow_tf32 = True
assert policy.tf32_matmuls() is True
torch.backends.cuda.matmul.fp32_precision = "ieee"
assert policy.tf32_matmuls() is False
torch.backends.cuda.matmul.fp32_precision = "tf32"
assert policy.tf32_matmuls() is True
step = torch.compile(lambda x: x + 1 if policy.tf32_matmuls() else x - 1, backend="eager", fullgraph=True)
assert step(torch.zeros(1)).item() == 1
print("ok")
"""
    # TRITON_INTERPRET stands in for a GPU: the policy's compiled form is set up only where the kernels load.
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
