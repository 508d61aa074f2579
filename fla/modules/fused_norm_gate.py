"""``FusedRMSNormGated``: RMSNorm(x) * act(gate), Gated DeltaNet's output norm, in one kernel on CUDA."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from fla.modules.layernorm import rms_norm
from fla.utils import check_choice


class FusedRMSNormGated(nn.Module):
    """RMS-normalise ``x`` over its last dimension, scale by ``weight``, multiply by ``activation(g)``.

    ``forward(x, g, residual=None, prenorm=False, residual_in_fp32=False)``; x and g: [..., hidden_size].
    ``activation``: 'swish' (SiLU, the Gated DeltaNet default) or 'sigmoid'. The parameter is ``weight``
    [hidden_size], initialised to 1.
    """

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, eps: float = 1e-5,
                 activation: str = "swish", device=None, dtype=None):
        super().__init__()
        check_choice("activation", activation, ("swish", "silu", "sigmoid"))
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size, self.eps, self.activation = hidden_size, eps, activation
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype)) if elementwise_affine else None
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, activation={self.activation}"

    def forward(self, x: torch.Tensor, g: torch.Tensor, residual: Optional[torch.Tensor] = None,
                prenorm: bool = False, residual_in_fp32: bool = False):
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has last dimension {x.shape[-1]}, expected hidden_size={self.hidden_size}")
        return rms_norm(x, self.weight, self.bias, residual=residual, gate=g, activation=self.activation,
                        eps=self.eps, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
