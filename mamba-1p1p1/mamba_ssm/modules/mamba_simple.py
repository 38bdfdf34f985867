"""The Mamba mixer, with the bidirectional variants used by Vision Mamba."""
import math

import torch
import torch.nn as nn

from mamba_ssm.ops import linear_3xtf32
from mamba_ssm.ops.mamba_inner import (
    bimamba_inner_fn_no_out_proj,
    bimamba_v1_inner_fn_no_out_proj,
    mamba_inner_fn_no_out_proj,
)

BIMAMBA_TYPES = ("none", "v1", "v2")


def _ssm_decay_log(d_inner, d_state, device):
    """A_log = log([1..d_state]) for every channel, so that A = -exp(A_log) = -[1..d_state]."""
    A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(d_inner, 1)
    A_log = nn.Parameter(torch.log(A))
    A_log._no_weight_decay = True
    return A_log


def _ssm_skip(d_inner, device):
    D = nn.Parameter(torch.ones(d_inner, device=device))
    D._no_weight_decay = True
    return D


class Mamba(nn.Module):
    """Selective state-space mixer: (batch, seqlen, d_model) -> (batch, seqlen, d_model).

    bimamba_type: "none" (causal, one direction), "v1" (a second scan, with its own A_b_log, runs from the
    end over the forward direction's conv and projections; the directions are summed) or "v2" (Vim: the
    flipped direction has its own conv1d_b, x_proj_b, dt_proj_b, A_b_log and D_b). if_divide_out
    averages the two v2 directions instead of summing them.
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 layer_idx=None, device=None, dtype=None, bimamba_type="none", if_divide_out=False):
        super().__init__()
        if bimamba_type not in BIMAMBA_TYPES:
            raise ValueError(f"bimamba_type must be one of {BIMAMBA_TYPES}, got {bimamba_type!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.layer_idx = layer_idx
        self.bimamba_type = bimamba_type
        self.if_divide_out = if_divide_out
        dt_init_args = (dt_min, dt_max, dt_init, dt_scale, dt_init_floor)

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d, self.x_proj, self.dt_proj = self._direction(conv_bias, dt_init_args, factory)
        self.A_log = _ssm_decay_log(self.d_inner, d_state, device)
        self.D = _ssm_skip(self.d_inner, device)
        if bimamba_type in ("v1", "v2"):
            self.A_b_log = _ssm_decay_log(self.d_inner, d_state, device)
        if bimamba_type == "v2":
            self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._direction(conv_bias, dt_init_args, factory)
            self.D_b = _ssm_skip(self.d_inner, device)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _direction(self, conv_bias, dt_init_args, factory):
        """The conv, x_proj and dt_proj of one scan direction, initialised as in Mamba."""
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor = dt_init_args
        conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=self.d_conv, groups=self.d_inner,
                           padding=self.d_conv - 1, bias=conv_bias, **factory)
        x_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False, **factory)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                dt_proj.weight.fill_(dt_init_std)
            else:
                dt_proj.weight.uniform_(-dt_init_std, dt_init_std)
            # dt log-uniform in [dt_min, dt_max]; the bias is softplus^-1(dt) so softplus(bias) = dt.
            dt = torch.exp(torch.rand(self.d_inner, device=dt_proj.bias.device)
                           * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True
        return conv1d, x_proj, dt_proj

    def _direction_params(self, suffix):
        conv1d = getattr(self, "conv1d" + suffix)
        dt_proj = getattr(self, "dt_proj" + suffix)
        return dict(
            conv1d_weight=conv1d.weight, conv1d_bias=conv1d.bias,
            x_proj_weight=getattr(self, "x_proj" + suffix).weight,
            delta_proj_weight=dt_proj.weight, delta_bias=dt_proj.bias.float(),
            A=-torch.exp(getattr(self, "A" + suffix + "_log").float()),
            D=getattr(self, "D" + suffix).float(),
        )

    def forward(self, hidden_states):
        # xz: (batch, 2 * d_inner, seqlen), token-major
        xz = linear_3xtf32.linear(hidden_states, self.in_proj.weight, self.in_proj.bias).transpose(1, 2)
        forward_params = self._direction_params("")
        if self.bimamba_type == "none":
            y = mamba_inner_fn_no_out_proj(xz, **forward_params)
        elif self.bimamba_type == "v1":
            y = bimamba_v1_inner_fn_no_out_proj(xz, A_b=-torch.exp(self.A_b_log.float()), **forward_params)
        else:
            y = bimamba_inner_fn_no_out_proj(xz, forward_params, self._direction_params("_b"),
                                             out_scale=0.5 if self.if_divide_out else 1.0)
        # Without autograd nothing else holds xz (2 x d_inner per token): free it before out_proj allocates.
        del xz
        return linear_3xtf32.linear(y.transpose(1, 2), self.out_proj.weight, self.out_proj.bias)
