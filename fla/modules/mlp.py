"""``GatedMLP``: the SwiGLU feed-forward block, ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

State-dict keys (FLA's): ``gate_proj.weight`` [I, H], ``up_proj.weight`` [I, H], ``down_proj.weight`` [H, I].
``SwiGLULinear`` is the parameterless submodule that runs the fused ``swiglu_linear``; flame's tensor-parallel plan
addresses it as ``mlp.swiglu_linear`` with ``SwiGLULinearParallel`` (importable from here; it lives in
``fla.modules.parallel`` so that importing this file does not import ``torch.distributed``).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
import torch.nn as nn

from fla.modules.activations import swiglu, swiglu_linear
from fla.utils import check_choice, check_positive_int

SUPPORTED_ACTIVATIONS = ("swish", "silu")


def default_intermediate_size(hidden_size: int, hidden_ratio: float = 4) -> int:
    """FLA's rule: int(hidden_size * hidden_ratio * 2 / 3) rounded up to a multiple of 256 (1024 -> 2816)."""
    size = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


def _is_dtensor(t: Optional[torch.Tensor]) -> bool:
    # A DTensor can only exist once torch.distributed.tensor has been imported, so no import is needed to ask.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


class SwiGLULinear(nn.Module):
    """``forward(gate, up, weight, bias=None) = swiglu_linear(gate, up, weight, bias)``; no parameters.

    A module (rather than a function call) so that a tensor-parallel plan can attach ``SwiGLULinearParallel`` to it.
    When ``weight`` is a DTensor (after that plan is applied) each rank computes its partial sum on local shards.
    """

    def forward(self, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if _is_dtensor(weight):
            from fla.modules.parallel import sharded_swiglu_linear

            return sharded_swiglu_linear(gate, up, weight, bias)
        return swiglu_linear(gate, up, weight, bias)


class GatedMLP(nn.Module):
    """SwiGLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, all three linear layers without bias.

    Args:
        hidden_size: H, the input and output size.
        hidden_ratio: used only when ``intermediate_size`` is None; default 4.
        intermediate_size: I; default ``int(H * hidden_ratio * 2 / 3)`` rounded up to a multiple of 256.
        hidden_act: 'swish' (= 'silu'); SwiGLU is the only supported MLP.
        fuse_swiglu: run ``swiglu_linear`` (the backward recomputes the SwiGLU output instead of storing it).

    ``forward(x, **kwargs)``: x [..., H] -> [..., H]; extra keyword arguments (e.g. ``position_ids``) are ignored.
    """

    def __init__(
        self,
        hidden_size: int,
        hidden_ratio: Optional[float] = None,
        intermediate_size: Optional[int] = None,
        hidden_act: str = "swish",
        fuse_swiglu: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        if hidden_ratio is None:
            hidden_ratio = 4
        if isinstance(hidden_ratio, bool) or not isinstance(hidden_ratio, (int, float)) or not hidden_ratio > 0:
            raise ValueError(f"hidden_ratio must be a number > 0, got {hidden_ratio!r}")
        if intermediate_size is None:
            intermediate_size = default_intermediate_size(hidden_size, hidden_ratio)
        check_positive_int("intermediate_size", intermediate_size)
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act={hidden_act!r} is not supported: GatedMLP is a SwiGLU MLP; "
                f"choose one of {', '.join(repr(a) for a in SUPPORTED_ACTIVATIONS)}"
            )
        check_choice("fuse_swiglu", fuse_swiglu, (True, False))

        self.hidden_size = hidden_size
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.fuse_swiglu = bool(fuse_swiglu)

        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **factory)
        # always present (it has no parameters), so a TP plan naming `mlp.swiglu_linear` resolves either way
        self.swiglu_linear = SwiGLULinear()

    def extra_repr(self) -> str:
        return f"hidden_act={self.hidden_act!r}, fuse_swiglu={self.fuse_swiglu}"

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has last dimension {x.shape[-1]}, expected hidden_size={self.hidden_size}")
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.fuse_swiglu:
            return self.swiglu_linear(gate, up, self.down_proj.weight, self.down_proj.bias)
        return self.down_proj(swiglu(gate, up))


def __getattr__(name: str):
    # `from fla.modules.mlp import SwiGLULinearParallel` (flame's TP plan) without importing torch.distributed here
    if name == "SwiGLULinearParallel":
        from fla.modules.parallel import SwiGLULinearParallel

        return SwiGLULinearParallel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
