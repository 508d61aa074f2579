"""Cross-entropy over a large vocabulary: the ``FusedCrossEntropyLoss`` module and ``cross_entropy_loss`` function.

Same value as ``torch.nn.functional.cross_entropy`` with ``ignore_index`` and ``label_smoothing``, plus two options
that language-model trainers use: the logits are multiplied by ``logit_scale`` first, and a z-loss
``lse_square_scale * logsumexp(logits)^2`` is added per counted token. Per row, with z = logit_scale * logits:

    loss = lse(z) - (1 - label_smoothing) * z[target] - label_smoothing * mean(z) + lse_square_scale * lse(z)^2

Rows whose target is ``ignore_index`` count 0 and are left out of the mean; a batch with no counted token gives a
loss of 0 and zero gradients (``torch.nn.functional.cross_entropy`` gives NaN). The loss is float32 whatever the
logits' dtype; the gradient has the logits' dtype.

Backends (see ``fla.utils.backend``): on CUDA tensors Triton kernels (``fla.modules.cross_entropy_kernels``): the
forward reads each row once for its loss and log-sum-exp; the backward reads it once more and writes the gradient
(into the logits' own memory with ``inplace_backward=True``). Elsewhere plain torch ops in float32, differentiated by
autograd.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

from fla.utils import (
    FLOAT_DTYPES,
    autocast_custom_bwd,
    autocast_custom_fwd,
    check_choice,
    check_non_negative_float,
    check_tensor,
    use_triton,
)

REDUCTIONS = ("mean", "sum", "none")
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_loss_options(ignore_index, reduction, label_smoothing, logit_scale, lse_square_scale=0.0) -> None:
    """Validate the options shared by the cross-entropy losses (``ValueError`` naming the bad one)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    check_choice("reduction", reduction, REDUCTIONS)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale!r}")
    check_non_negative_float("lse_square_scale", lse_square_scale)


def flatten_target(target, rows_shape: torch.Size, device: torch.device, rows_name: str) -> torch.Tensor:
    """Check ``target`` against the leading shape of the scores and return it as an int64 vector [N]."""
    check_tensor("target", target, dtype=INDEX_DTYPES, device=device)
    N = math.prod(rows_shape)
    if tuple(target.shape) != tuple(rows_shape) and tuple(target.shape) != (N,):
        raise ValueError(
            f"target must have shape {list(rows_shape)} (the leading dimensions of {rows_name}) or [{N}], "
            f"got {list(target.shape)}"
        )
    return target.reshape(N).long()


def cross_entropy_torch(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
) -> torch.Tensor:
    """Per-row loss [N] (float32, 0 for ignored rows) of ``logits`` [N, V]; plain torch ops, autograd-friendly."""
    z = logits.float() * logit_scale
    lse = torch.logsumexp(z, dim=-1)
    valid = target != ignore_index
    z_t = z.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    loss = lse - (1.0 - label_smoothing) * z_t
    if label_smoothing > 0:
        loss = loss - label_smoothing * z.mean(dim=-1)
    if lse_square_scale > 0:
        loss = loss + lse_square_scale * lse.square()
    return torch.where(valid, loss, torch.zeros_like(loss))


def cross_entropy_with_grad_torch(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    lse_square_scale: float,
    grad_scale: torch.Tensor,
    dloss: Optional[torch.Tensor] = None,
    compute_grad: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-row loss [N] and, explicitly (no autograd), the float32 gradient of ``sum(grad_scale * dloss * loss)``
    with respect to ``logits`` [N, V]. ``dloss``: None (= 1) or a per-row [N] tensor. The torch twin of
    ``cross_entropy_kernels.cross_entropy_fwd`` with a gradient buffer.
    """
    V = logits.shape[-1]
    z = logits.float() * logit_scale
    lse = torch.logsumexp(z, dim=-1)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).unsqueeze(-1)
    loss = lse - (1.0 - label_smoothing) * z.gather(-1, safe_target).squeeze(-1) + lse_square_scale * lse.square()
    if label_smoothing > 0:
        loss = loss - label_smoothing * z.mean(dim=-1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if not compute_grad:
        return loss, None
    grad = z.sub_(lse.unsqueeze(-1)).exp_()
    grad.mul_((1.0 + 2.0 * lse_square_scale * lse).unsqueeze(-1))
    if label_smoothing > 0:
        grad.sub_(label_smoothing / V)
    grad.scatter_add_(-1, safe_target, torch.full_like(safe_target, label_smoothing - 1.0, dtype=grad.dtype))
    factor = valid.float() * (grad_scale.float() * logit_scale)
    if dloss is not None:
        factor = factor * dloss.float()
    grad.mul_(factor.unsqueeze(-1))
    return loss, grad


def counted_tokens_scale(target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """1-element float32 tensor: 1 / (number of non-ignored targets, at least 1) for 'mean', else 1.

    Kept on the device so that no host synchronisation is needed.
    """
    if reduction == "mean":
        count = (target != ignore_index).sum().clamp_(min=1)
        return count.reshape(1).float().reciprocal_()
    return torch.ones(1, device=target.device, dtype=torch.float32)


class CrossEntropyFunction(torch.autograd.Function):
    """Triton path of ``cross_entropy_loss`` on flattened logits [N, V] (last dimension contiguous)."""

    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, logits, target, ignore_index, label_smoothing, logit_scale, lse_square_scale, reduction,
                inplace_backward):
        from fla.modules.cross_entropy_kernels import cross_entropy_fwd

        # One read of the logits for loss and log-sum-exp; the gradient is written by the backward (one more read
        # and one write), which beats computing it here and rescaling it there (two more passes over [N, V]).
        grad_scale = counted_tokens_scale(target, ignore_index, reduction)
        loss, lse = cross_entropy_fwd(logits, target, ignore_index, label_smoothing, logit_scale, lse_square_scale)
        ctx.inplace_backward = inplace_backward
        ctx.options = (ignore_index, label_smoothing, logit_scale, lse_square_scale)
        ctx.save_for_backward(logits, target, lse, grad_scale)
        if reduction == "none":
            return loss
        return (loss.sum() * grad_scale).squeeze(0)

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, dloss):
        from fla.modules.cross_entropy_kernels import cross_entropy_bwd

        logits, target, lse, grad_scale = ctx.saved_tensors
        dlogits = logits if ctx.inplace_backward else torch.empty_like(logits)
        dlogits = cross_entropy_bwd(logits, target, lse, grad_scale, dloss.float().contiguous(), dlogits, *ctx.options)
        return dlogits, None, None, None, None, None, None, None


def cross_entropy_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` against class indices ``target`` (see the module docstring for the formula).

    Args:
        logits: [..., V], float32 / float16 / bfloat16.
        target: integer class indices, shaped like ``logits.shape[:-1]`` or flattened [N]; ``ignore_index`` rows
            are not counted. Other out-of-range values are an error on the torch path and undefined on the
            Triton path.
        ignore_index: the target value of rows to leave out.
        reduction: 'mean' (over counted rows; 0 when there is none), 'sum' or 'none'.
        label_smoothing: in [0, 1), as in ``torch.nn.functional.cross_entropy``.
        logit_scale: multiplies the logits before everything else.
        lse_square_scale: weight of the z-loss ``lse^2`` added per counted row (>= 0).
        inplace_backward: Triton path only: the backward writes the gradient into the logits' memory, which
            saves an [N, V] buffer; the logits hold garbage after the backward, and a second backward through the
            same graph is wrong.

    Returns:
        float32 loss: a scalar for 'mean' / 'sum', shaped like ``target`` for 'none'.
    """
    check_tensor("logits", logits, dtype=FLOAT_DTYPES)
    if logits.ndim < 1:
        raise ValueError("logits must have at least 1 dimension (the vocabulary), got a 0-dim tensor")
    check_loss_options(ignore_index, reduction, label_smoothing, logit_scale, lse_square_scale)
    V = logits.shape[-1]
    if V < 1:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {list(logits.shape)}")
    target_shape = target.shape if isinstance(target, torch.Tensor) else None
    target = flatten_target(target, logits.shape[:-1], logits.device, "logits")
    logits2d = logits.reshape(-1, V)
    options = (ignore_index, float(label_smoothing), float(logit_scale), float(lse_square_scale))
    if use_triton(logits):
        if logits2d.stride(-1) != 1:
            logits2d = logits2d.contiguous()
        loss = CrossEntropyFunction.apply(logits2d, target, *options, reduction, bool(inplace_backward))
    else:
        rows = cross_entropy_torch(logits2d, target, *options)
        if reduction == "none":
            loss = rows
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / (target != ignore_index).sum().clamp(min=1)
    return loss.reshape(target_shape) if reduction == "none" else loss


class FusedCrossEntropyLoss(nn.Module):
    """Cross-entropy loss module: ``forward(logits [..., V], target) -> loss`` (float32).

    See ``cross_entropy_loss`` for the arguments; they are fixed at construction. Drop-in for
    ``nn.CrossEntropyLoss`` in language-model heads, with FLA's extra options (``logit_scale``, the z-loss
    ``lse_square_scale``, ``inplace_backward``).
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        logit_scale: float = 1.0,
        lse_square_scale: float = 0.0,
        inplace_backward: bool = False,
    ):
        super().__init__()
        check_loss_options(ignore_index, reduction, label_smoothing, logit_scale, lse_square_scale)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.logit_scale = float(logit_scale)
        self.lse_square_scale = float(lse_square_scale)
        self.inplace_backward = bool(inplace_backward)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, logit_scale={self.logit_scale}, "
                f"lse_square_scale={self.lse_square_scale}, inplace_backward={self.inplace_backward}")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy_loss(logits, target, ignore_index=self.ignore_index, reduction=self.reduction,
                                  label_smoothing=self.label_smoothing, logit_scale=self.logit_scale,
                                  lse_square_scale=self.lse_square_scale, inplace_backward=self.inplace_backward)
