"""RMS normalisation: the ``RMSNorm`` module and the ``rms_norm`` function, optionally fused with a residual add.

``rms_norm`` (and the gated variant in ``fla.modules.fused_norm_gate``) dispatch on the input's device: the Triton
kernels in ``fla.modules.rms_norm_kernels`` for CUDA tensors, plain torch ops in float32 elsewhere (see
``fla.utils.backend``). Both compute the same function:

    s = x + residual            (when a residual is given; kept in float32, or the residual's dtype when returned)
    y = s / sqrt(mean(s^2) + eps) * weight + bias   (then * act(gate) when gated)
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fla.utils import (
    FLOAT_DTYPES,
    autocast_custom_bwd,
    autocast_custom_fwd,
    check_choice,
    check_tensor,
    use_triton,
)


def _gate_activation(g: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(g) if activation in ("swish", "silu") else torch.sigmoid(g)


def rms_norm_torch(x, weight=None, bias=None, residual=None, gate=None, activation="swish", eps=1e-6,
                   residual_dtype=None):
    """Torch path (and float32 reference) of the fused RMSNorm. Returns (y in x.dtype, s or None)."""
    s = x.float()
    if residual is not None:
        s = s + residual.float()
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    if gate is not None:
        y = y * _gate_activation(gate.float(), activation)
    s_out = s.to(residual_dtype) if residual is not None else None
    return y.to(x.dtype), s_out


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, x, weight, bias, residual, gate, activation, eps, prenorm, residual_dtype):
        from fla.modules.rms_norm_kernels import rms_norm_fwd

        shape = x.shape
        D = shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        res2 = residual.reshape(-1, D).contiguous() if residual is not None else None
        gate2 = gate.reshape(-1, D).contiguous() if gate is not None else None
        store = residual is not None
        y, s, rstd = rms_norm_fwd(x2, res2, weight, bias, gate2, activation, eps, store, residual_dtype)
        ctx.save_for_backward(s if store else x2, rstd, weight, bias, gate2)
        ctx.activation, ctx.shape = activation, shape
        ctx.prenorm = prenorm
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = residual.dtype if residual is not None else None
        y = y.reshape(shape)
        if prenorm:
            return y, (s if store else x2).reshape(shape)
        return y

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, dy, *rest):
        from fla.modules.rms_norm_kernels import rms_norm_bwd

        s, rstd, weight, bias, gate = ctx.saved_tensors
        D = ctx.shape[-1]
        dres_out = rest[0] if ctx.prenorm else None
        dres_out = dres_out.reshape(-1, D).contiguous() if dres_out is not None else None
        dx, dres, dg, dw, db = rms_norm_bwd(dy.reshape(-1, D).contiguous(), s, rstd, weight, bias, gate,
                                            ctx.activation, dres_out, ctx.x_dtype, ctx.residual_dtype)
        dx = dx.reshape(ctx.shape)
        dres = dres.reshape(ctx.shape) if dres is not None else None
        dg = dg.reshape(ctx.shape) if dg is not None else None
        return dx, dw, db, dres, dg, None, None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    activation: str = "swish",
    eps: float = 1e-6,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """RMS-normalise ``x`` over its last dimension, optionally adding ``residual`` first and gating the output.

    Args:
        x: [..., D], float32 / float16 / bfloat16.
        weight, bias: [D] or None.
        residual: same shape as ``x`` or None; added to ``x`` before normalising.
        gate: same shape as ``x`` or None; the output is multiplied by ``activation(gate)``.
        activation: 'swish' (= 'silu') or 'sigmoid'; used only with a gate.
        eps: added to the mean square.
        prenorm: also return the normalised input ``s = x + residual`` (the new residual stream).
        residual_in_fp32: keep the returned ``s`` in float32 (else in the residual's, or x's, dtype).

    Returns:
        y [..., D] in x.dtype, and with ``prenorm`` also ``s`` [..., D].
    """
    check_tensor("x", x, dtype=FLOAT_DTYPES)
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, shape=(D,), dtype=FLOAT_DTYPES, device=x.device)
    for name, t in (("residual", residual), ("gate", gate)):
        if t is not None:
            check_tensor(name, t, shape=tuple(x.shape), dtype=FLOAT_DTYPES, device=x.device)
    check_choice("activation", activation, ("swish", "silu", "sigmoid"))
    residual_dtype = torch.float32 if residual_in_fp32 else (residual.dtype if residual is not None else x.dtype)
    if use_triton(x):
        out = RMSNormFunction.apply(x, weight, bias, residual, gate, activation, float(eps), prenorm, residual_dtype)
        return out
    y, s = rms_norm_torch(x, weight, bias, residual, gate, activation, eps, residual_dtype)
    if prenorm:
        return y, (s if s is not None else x.to(residual_dtype))
    return y


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension, with an optional fused residual add.

    ``forward(x, residual=None, prenorm=False, residual_in_fp32=False)`` returns ``y`` or, with ``prenorm=True``,
    ``(y, x + residual)``: the block code uses that to carry the residual stream through the fused kernel.
    The parameter is ``weight`` [hidden_size] (and ``bias`` when ``bias=True``), initialised to 1 (0).
    """

    def __init__(self, hidden_size: int, elementwise_affine: bool = True, bias: bool = False, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size, self.eps, self.elementwise_affine = hidden_size, eps, elementwise_affine
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(hidden_size, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(hidden_size, **factory)) if elementwise_affine and bias else None
        if bias and not elementwise_affine:
            raise ValueError("bias=True needs elementwise_affine=True")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}" + ("" if self.elementwise_affine else ", elementwise_affine=False")

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, prenorm: bool = False,
                residual_in_fp32: bool = False):
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has last dimension {x.shape[-1]}, expected hidden_size={self.hidden_size}")
        return rms_norm(x, self.weight, self.bias, residual=residual, eps=self.eps, prenorm=prenorm,
                        residual_in_fp32=residual_in_fp32)
