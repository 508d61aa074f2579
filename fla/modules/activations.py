"""SwiGLU: ``swiglu(gate, up) = silu(gate) * up``, and ``swiglu_linear``, the SwiGLU output fed into a linear layer.

Both functions dispatch on the device of ``gate`` (see ``fla.utils.backend``): the Triton kernels below for CUDA
tensors, torch ops elsewhere. Arithmetic is in float32 whatever the storage dtype; outputs keep the input dtype.

    forward:   s = sigmoid(gate);  y = gate * s * up
    backward:  dgate = dy * up * s * (1 + gate * (1 - s));  dup = dy * gate * s

``swiglu_linear(gate, up, weight, bias)`` equals ``F.linear(swiglu(gate, up), weight, bias)`` but does not keep the
[..., intermediate] SwiGLU output for the backward pass: the backward kernel recomputes it while it computes the
gradients of ``gate`` and ``up``. That is what ``GatedMLP(fuse_swiglu=True)`` uses.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fla.utils import FLOAT_DTYPES, autocast_custom_bwd, autocast_custom_fwd, check_tensor, use_triton

# Elements per Triton program: the kernels see gate / up as flat 1-D arrays.
BLOCK_SIZE = 1024
NUM_WARPS = 4


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(G, U, DY, DG, DU, Y, N, STORE_Y: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    gs = g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * gs
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)
    if STORE_Y:
        # the forward output, recomputed for swiglu_linear's weight gradient
        tl.store(Y + offs, (gs * u).to(Y.dtype.element_ty), mask=mask)


def swiglu_fwd_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton forward. gate, up: same shape and dtype. Returns y in gate's dtype and shape."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    if n > 0:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](gate, up, y, n, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    return y


def swiglu_bwd_triton(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor, recompute_output: bool = False
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Triton backward: (dgate, dup, y or None) in gate's dtype and shape; ``y`` only with ``recompute_output``."""
    gate, up, dy = gate.contiguous(), up.contiguous(), dy.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    y = torch.empty_like(gate) if recompute_output else None
    n = gate.numel()
    if n > 0:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
            gate, up, dy, dg, du, y, n, STORE_Y=recompute_output, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS,
        )
    return dg, du, y


def swiglu_fwd_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Torch forward in float32; the result is in gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu_bwd_torch(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor, recompute_output: bool = False
                     ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Torch version of ``swiglu_bwd_triton`` (same formulas, float32 arithmetic)."""
    g, u, d = gate.float(), up.float(), dy.float()
    s = torch.sigmoid(g)
    gs = g * s
    dg = (d * u * s * (1 + g * (1 - s))).to(gate.dtype)
    du = (d * gs).to(up.dtype)
    y = (gs * u).to(gate.dtype) if recompute_output else None
    return dg, du, y


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_fwd_triton(gate, up)

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du, _ = swiglu_bwd_triton(gate, up, dy)
        return dg, du


class SwiGLULinearFunction(torch.autograd.Function):
    """out = F.linear(swiglu(gate, up), weight, bias), saving gate and up (not the SwiGLU output) for backward.

    ``kernels`` picks the elementwise implementation (Triton or torch); the linear algebra is torch's either way.
    """

    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, gate, up, weight, bias, kernels):
        y = swiglu_fwd_triton(gate, up) if kernels else swiglu_fwd_torch(gate, up)
        out = F.linear(y, weight, bias)
        ctx.save_for_backward(gate, up, weight)
        ctx.kernels, ctx.has_bias = kernels, bias is not None
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, dout):
        gate, up, weight = ctx.saved_tensors
        need_gate_up = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_weight = ctx.needs_input_grad[2]
        out_features = dout.shape[-1]
        dout2 = dout.reshape(-1, out_features)
        dgate = dup = dweight = dbias = None
        if need_gate_up or need_weight:
            # the backward runs under the forward's autocast state, so these matmuls take the forward's dtype
            dy = torch.matmul(dout, weight)
            bwd = swiglu_bwd_triton if ctx.kernels else swiglu_bwd_torch
            dgate, dup, y = bwd(gate, up, dy, recompute_output=need_weight)
            if need_weight:
                dweight = (dout2.t() @ y.reshape(-1, y.shape[-1])).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            dbias = dout2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dgate, dup, dweight, dbias, None


def _check_gate_up(gate, up) -> None:
    check_tensor("gate", gate, dtype=FLOAT_DTYPES)
    check_tensor("up", up, shape=tuple(gate.shape), dtype=gate.dtype, device=gate.device)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gating: ``silu(gate) * up``, elementwise.

    Args:
        gate, up: tensors of one shape (any), dtype (float32 / float16 / bfloat16) and device.

    Returns:
        A tensor of that shape and dtype. Computed in float32 (Triton kernels on CUDA, torch ops elsewhere).
    """
    _check_gate_up(gate, up)
    if use_triton(gate):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_fwd_torch(gate, up)


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(swiglu(gate, up), weight, bias)`` without storing the SwiGLU output for the backward pass.

    Args:
        gate, up: [..., I], one dtype (float32 / float16 / bfloat16) and device.
        weight: [O, I]; its dtype must equal gate's unless autocast is on (then the linear runs in autocast's dtype).
        bias: [O] or None.

    Returns:
        [..., O]. The backward recomputes ``swiglu(gate, up)`` (fused into the elementwise backward kernel), which
        saves one [..., I] activation per layer.
    """
    _check_gate_up(gate, up)
    in_features = gate.shape[-1]
    check_tensor("weight", weight, ndim=2, dtype=FLOAT_DTYPES, device=gate.device)
    if weight.shape[1] != in_features:
        raise ValueError(
            f"weight must have shape [out_features, {in_features}] (in_features = gate.shape[-1]), "
            f"got {list(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],), dtype=FLOAT_DTYPES, device=gate.device)
    if not torch.is_autocast_enabled(gate.device.type):
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != gate.dtype:
                raise ValueError(
                    f"{name} has dtype {str(t.dtype)[6:]} but gate has {str(gate.dtype)[6:]}; use one dtype, "
                    "or run under torch.autocast"
                )
    return SwiGLULinearFunction.apply(gate, up, weight, bias, use_triton(gate))
