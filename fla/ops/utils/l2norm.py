"""L2 normalisation over the last dimension: ``y = x / sqrt(sum(x^2) + eps)`` (eps inside the square root).

Gated DeltaNet normalises its queries and keys this way. ``l2norm`` dispatches on the input's device
(``fla.utils.use_triton``): Triton kernels over the rows of the flattened [M, D] tensor for CUDA tensors, plain torch
ops in float32 elsewhere. All arithmetic is in float32 whatever the storage dtype.

Forward, per row:   r = 1 / sqrt(sum(x^2) + eps);  y = x * r          (r is saved in float32)
Backward, per row:  dx = r * (dy - y * sum(dy * y))
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fla.utils import (
    FLOAT_DTYPES,
    autocast_custom_bwd,
    autocast_custom_fwd,
    check_non_negative_float,
    check_tensor,
    use_triton,
)


@triton.jit
def _l2norm_fwd_kernel(X, Y, RSTD, M, D, eps, BM: tl.constexpr, BD: tl.constexpr):
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m = o_m < M
    mask = m_m[:, None] & (o_d < D)[None, :]
    off = o_m[:, None] * D + o_d[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + eps)
    tl.store(RSTD + o_m, rstd, mask=m_m)
    tl.store(Y + off, (x * rstd[:, None]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _l2norm_bwd_kernel(X, RSTD, DY, DX, M, D, BM: tl.constexpr, BD: tl.constexpr):
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m = o_m < M
    mask = m_m[:, None] & (o_d < D)[None, :]
    off = o_m[:, None] * D + o_d[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + o_m, mask=m_m, other=0.0)
    y = x * rstd[:, None]
    dx = rstd[:, None] * (dy - y * tl.sum(dy * y, axis=1)[:, None])
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)


def _blocks(D: int) -> Tuple[int, int]:
    BD = triton.next_power_of_2(D)
    if BD > 16384:
        raise ValueError(f"the normalised dimension D={D} is too large for the l2norm kernel (at most 16384)")
    return max(1, min(64, 4096 // BD)), BD


def _num_warps(BM: int, BD: int) -> int:
    return min(max(BM * BD // 1024, 1), 8)


def l2norm_fwd(x: torch.Tensor, eps: float = 1e-6, output_dtype: Optional[torch.dtype] = None):
    """x: [M, D] contiguous. Returns (y [M, D] in output_dtype or x.dtype, rstd [M] float32)."""
    M, D = x.shape
    y = torch.empty((M, D), device=x.device, dtype=output_dtype or x.dtype)
    rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, rstd
    BM, BD = _blocks(D)
    _l2norm_fwd_kernel[(triton.cdiv(M, BM),)](x, y, rstd, M, D, float(eps), BM=BM, BD=BD, num_warps=_num_warps(BM, BD))
    return y, rstd


def l2norm_bwd(x: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient of ``l2norm_fwd``: x, dy [M, D] contiguous, rstd [M] float32. Returns dx [M, D] in x.dtype."""
    M, D = x.shape
    dx = torch.empty_like(x)
    if M == 0:
        return dx
    BM, BD = _blocks(D)
    _l2norm_bwd_kernel[(triton.cdiv(M, BM),)](x, rstd, dy, dx, M, D, BM=BM, BD=BD, num_warps=_num_warps(BM, BD))
    return dx


def l2norm_torch(x: torch.Tensor, eps: float = 1e-6, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Torch path (and float32 reference): x / sqrt(sum(x^2, -1) + eps), in output_dtype or x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


class L2NormFunction(torch.autograd.Function):
    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, x, eps, output_dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y, rstd = l2norm_fwd(x2, eps, output_dtype)
        ctx.save_for_backward(x2, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, dy):
        x2, rstd = ctx.saved_tensors
        dx = l2norm_bwd(x2, rstd, dy.reshape(x2.shape).contiguous())
        return dx.reshape(ctx.shape), None, None


def l2norm(x: torch.Tensor, eps: float = 1e-6, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """L2-normalise ``x`` over its last dimension: ``x / sqrt(sum(x^2) + eps)``.

    Args:
        x: [..., D], float32 / float16 / bfloat16.
        eps: added to the sum of squares, inside the square root.
        output_dtype: dtype of the result (default: x.dtype). The gradient w.r.t. x has x's dtype.

    Returns:
        y [..., D] in ``output_dtype`` or x.dtype.
    """
    check_tensor("x", x, dtype=FLOAT_DTYPES)
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dimension (the normalised one), got a 0-d tensor")
    eps = check_non_negative_float("eps", eps)
    if output_dtype is not None and output_dtype not in FLOAT_DTYPES:
        raise ValueError(f"output_dtype={output_dtype!r} is not allowed; "
                         "choose None, torch.float32, torch.float16 or torch.bfloat16")
    if use_triton(x):
        return L2NormFunction.apply(x, eps, output_dtype)
    return l2norm_torch(x, eps, output_dtype)


l2_norm = l2norm  # FLA's alias
