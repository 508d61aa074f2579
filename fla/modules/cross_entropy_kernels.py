"""Triton kernels for the cross-entropy loss over a large vocabulary, one program per row.

Shared by ``fla.modules.fused_cross_entropy`` and ``fla.modules.fused_linear_cross_entropy``. A row holds V logits
``l``; with ``z = logit_scale * l``, smoothing ``eps``, z-loss weight ``c`` and target ``t``:

    lse  = log(sum_j exp(z_j))                                         (online max / sum-exp over vocab blocks)
    loss = lse - (1 - eps) * z_t - eps * mean_j(z_j) + c * lse^2       (0 for rows whose target is ignore_index)
    dloss/dl_j = logit_scale * (p_j * (1 + 2 c lse) - (1 - eps) [j == t] - eps / V),   p = softmax(z)

All arithmetic is in float32 whatever the storage dtype; the gradient is stored in the dtype of its buffer, which
may be the logits themselves (in place). ``grad_scale`` (a 1-element float32 tensor, e.g. 1 / number of counted
tokens for a mean) and an optional per-row or scalar ``dloss`` multiply the gradient; they are read on the device so
that no host synchronisation is needed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _write_grad(
    row_logits, row_dlogits, target, lse, factor, V, logit_scale, label_smoothing, lse_square_scale,
    BLOCK_V: tl.constexpr,
):
    """Second pass over one row: dlogits = factor * logit_scale * (softmax * (1 + 2c lse) - smoothed one-hot)."""
    p_coef = 1.0 + 2.0 * lse_square_scale * lse
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_logits + cols, mask=mask, other=float("-inf")).to(tl.float32) * logit_scale
        g = tl.exp(z - lse) * p_coef - label_smoothing / V
        g = tl.where(cols == target, g - (1.0 - label_smoothing), g)
        g = g * (factor * logit_scale)
        tl.store(row_dlogits + cols, g.to(row_dlogits.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS, DLOGITS, TARGET, LOSS, LSE, GRAD_SCALE, DLOSS,
    stride_logits, stride_dlogits, V, ignore_index, logit_scale, label_smoothing, lse_square_scale,
    HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr, HAS_DLOSS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits = LOGITS + row * stride_logits
    target = tl.load(TARGET + row).to(tl.int64)
    valid = target != ignore_index

    # Running max and sum of exp per row, rescaled once per vocabulary block, so that each logit costs one exp.
    # The finite initial max keeps a block of -inf logits (or the masked tail) from producing NaN.
    m = tl.full([], -1e30, dtype=tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    z_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_logits + cols, mask=mask, other=float("-inf")).to(tl.float32) * logit_scale
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            z_sum += tl.where(mask, z, 0.0)
    lse = m + tl.log(s)

    in_range = (target >= 0) & (target < V)
    z_t = tl.load(row_logits + tl.where(in_range, target, 0)).to(tl.float32) * logit_scale
    loss = lse - (1.0 - label_smoothing) * z_t + lse_square_scale * lse * lse
    if HAS_SMOOTHING:
        loss -= label_smoothing * (tl.sum(z_sum, axis=0) / V)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, lse)

    if COMPUTE_GRAD:
        factor = tl.load(GRAD_SCALE)
        if HAS_DLOSS:
            factor = factor * tl.load(DLOSS + row).to(tl.float32)
        factor = tl.where(valid, factor, 0.0)
        _write_grad(row_logits, DLOGITS + row * stride_dlogits, target, lse, factor, V, logit_scale,
                    label_smoothing, lse_square_scale, BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(
    LOGITS, DLOGITS, TARGET, LSE, GRAD_SCALE, DLOSS,
    stride_logits, stride_dlogits, stride_dloss, V, ignore_index, logit_scale, label_smoothing, lse_square_scale,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGET + row).to(tl.int64)
    lse = tl.load(LSE + row)
    factor = tl.load(GRAD_SCALE) * tl.load(DLOSS + row * stride_dloss).to(tl.float32)
    factor = tl.where(target != ignore_index, factor, 0.0)
    _write_grad(LOGITS + row * stride_logits, DLOGITS + row * stride_dlogits, target, lse, factor, V, logit_scale,
                label_smoothing, lse_square_scale, BLOCK_V)


def _block_v(V: int, device: torch.device) -> Tuple[int, int]:
    """(BLOCK_V, num_warps). Small blocks when interpreted, so that the tests walk several vocab blocks."""
    if device.type == "cuda":
        return min(triton.next_power_of_2(V), 4096), 8
    return min(triton.next_power_of_2(V), 128), 4


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    lse_square_scale: float,
    grad_scale: Optional[torch.Tensor] = None,
    dlogits: Optional[torch.Tensor] = None,
    dloss: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and log-sum-exp of ``logits`` [N, V] (last dimension contiguous) for ``target`` [N].

    With ``dlogits`` ([N, V], last dimension contiguous; may be ``logits`` itself for an in-place update), also
    writes the gradient of ``grad_scale * sum(dloss * loss)`` into it (``dloss``: contiguous [N] or None = 1).
    Returns (loss [N] float32, lse [N] float32).
    """
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    if N == 0:
        return loss, lse
    compute_grad = dlogits is not None
    if compute_grad and grad_scale is None:
        raise ValueError("cross_entropy_fwd: dlogits needs grad_scale (a 1-element float32 tensor)")
    block_v, num_warps = _block_v(V, logits.device)
    _cross_entropy_fwd_kernel[(N,)](
        logits, dlogits, target, loss, lse, grad_scale, dloss,
        logits.stride(0), dlogits.stride(0) if compute_grad else 0, V, ignore_index,
        float(logit_scale), float(label_smoothing), float(lse_square_scale),
        HAS_SMOOTHING=label_smoothing > 0, COMPUTE_GRAD=compute_grad, HAS_DLOSS=dloss is not None,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return loss, lse


def cross_entropy_bwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_scale: torch.Tensor,
    dloss: torch.Tensor,
    dlogits: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    lse_square_scale: float,
) -> torch.Tensor:
    """Write d(sum_n dloss_n * grad_scale * loss_n)/dlogits into ``dlogits`` (may be ``logits``); returns it.

    ``dloss`` is a scalar (0-dim or 1-element) or a per-row [N] tensor.
    """
    N, V = logits.shape
    if N == 0:
        return dlogits
    dloss = dloss.reshape(-1)
    stride_dloss = 0 if dloss.numel() == 1 else dloss.stride(0)
    block_v, num_warps = _block_v(V, logits.device)
    _cross_entropy_bwd_kernel[(N,)](
        logits, dlogits, target, lse, grad_scale, dloss,
        logits.stride(0), dlogits.stride(0), stride_dloss, V, ignore_index,
        float(logit_scale), float(label_smoothing), float(lse_square_scale),
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return dlogits
