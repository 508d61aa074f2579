"""Cross-entropy of a linear LM head without the [N, V] logits: ``FusedLinearCrossEntropyLoss``.

``fused_linear_cross_entropy_loss(x, target, weight, bias)`` equals ``cross_entropy_loss(x @ weight.T + bias,
target)`` (same options as ``fla.modules.fused_cross_entropy``, without the z-loss), but walks the tokens in
``num_chunks`` chunks: per chunk it computes the logits [n, V], their loss and gradient (the Triton kernel on CUDA,
torch elsewhere), and at once the gradients of x, weight and bias, which the forward stores. The backward only
multiplies them by the incoming gradient. Peak memory is one chunk of logits plus the weight gradient (kept in
float32 across chunks) instead of the full logits and their gradient. With ``reduction='none'`` the per-token
incoming gradient is not known during the forward, so the backward walks the chunks once more.

Compute dtype: on the Triton path the matmuls run in the autocast dtype when autocast is on, else in the promoted
dtype of x and weight (never a silent downcast); the torch path computes in float32. The loss is float32; the
gradients take the dtypes of x, weight and bias.

``LinearLossParallel`` is the tensor-parallel ``ParallelStyle`` that flame's plans put on the model's criterion. It is
built on first access (``from fla.modules.fused_linear_cross_entropy import LinearLossParallel``), so that importing
this module does not import torch's DTensor machinery (half a second) and works without distributed support.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fla.modules.fused_cross_entropy import (
    check_loss_options,
    counted_tokens_scale,
    cross_entropy_with_grad_torch,
    flatten_target,
)
from fla.utils import (
    FLOAT_DTYPES,
    autocast_custom_bwd,
    autocast_custom_fwd,
    check_non_negative_float,
    check_positive_int,
    check_tensor,
    use_triton,
)

def _compute_dtype(x: torch.Tensor, weight: torch.Tensor, triton: bool) -> torch.dtype:
    if not triton:
        return torch.float32
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def _chunked_loss_and_grads(x, target, weight, bias, options, num_chunks, compute_dtype, triton, grad_scale,
                            dloss, need_dx, need_dw, need_db, l2_penalty_factor):
    """Walk the tokens of x [N, H] in chunks; return (loss [N] float32, dx, dweight, dbias) (None where not needed).

    The gradients are those of ``sum_n grad_scale * dloss_n * loss_n`` (``dloss``: [N] float32, or None = 1), plus
    the L2-warp term when ``l2_penalty_factor`` is not None. dx has x's dtype; dweight and dbias are float32.
    """
    N, H = x.shape
    V = weight.shape[0]
    ignore_index, label_smoothing, logit_scale = options
    compute_grad = need_dx or need_dw or need_db
    loss = torch.empty(N, device=x.device, dtype=torch.float32)
    dx = torch.empty((N, H), device=x.device, dtype=x.dtype) if need_dx else None
    dw = torch.zeros((V, H), device=x.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros((V,), device=x.device, dtype=torch.float32) if need_db else None
    xs_all = x.to(compute_dtype)
    w = weight.to(compute_dtype)
    b = bias.to(compute_dtype) if bias is not None else None
    chunk = max(1, math.ceil(N / num_chunks))
    # Autocast is off inside: the dtypes above are the ones meant, also for the gradient matmuls.
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            xs, ts = xs_all[start:end], target[start:end]
            ds = dloss[start:end] if dloss is not None else None
            logits = F.linear(xs, w, b)
            if compute_grad and l2_penalty_factor is not None:
                max_logit, max_index = logits.max(dim=-1, keepdim=True)
            if triton:
                from fla.modules.cross_entropy_kernels import cross_entropy_fwd

                # The gradient overwrites the chunk's logits: no second [n, V] buffer.
                loss[start:end], _ = cross_entropy_fwd(logits, ts, ignore_index, label_smoothing, logit_scale, 0.0,
                                                       grad_scale, logits if compute_grad else None, ds)
                grad = logits
            else:
                loss[start:end], grad = cross_entropy_with_grad_torch(
                    logits, ts, ignore_index, label_smoothing, logit_scale, 0.0, grad_scale, ds, compute_grad)
            if compute_grad:
                if l2_penalty_factor is not None:
                    # L2-warp (RWKV's L2Wrap, as in FLA): pull each token's largest logit towards 0 with gradient
                    # max_logit * factor / (all tokens, ignored ones included); the loss value is unchanged.
                    penalty = max_logit.float() * (l2_penalty_factor / N)
                    if ds is not None:
                        penalty = penalty * ds.unsqueeze(-1)
                    grad.scatter_add_(-1, max_index, penalty.to(grad.dtype))
                if need_dx:
                    if dx.dtype == grad.dtype:
                        torch.mm(grad, w, out=dx[start:end])
                    else:
                        dx[start:end] = grad @ w
                if need_dw:
                    if grad.dtype == torch.float32:
                        dw.addmm_(grad.t(), xs)
                    else:  # one rounding per chunk; the sum over chunks is float32
                        dw.add_(grad.t() @ xs)
                if need_db:
                    db.add_(grad.sum(0, dtype=torch.float32))
            del logits, grad
    return loss, dx, dw, db


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked linear + cross-entropy on flattened x [N, H], target [N] (int64); see the module docstring."""

    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, x, target, weight, bias, ignore_index, label_smoothing, logit_scale, num_chunks, reduction,
                l2_penalty_factor):
        triton = use_triton(x)
        compute_dtype = _compute_dtype(x, weight, triton)
        grad_scale = counted_tokens_scale(target, ignore_index, reduction)
        options = (ignore_index, label_smoothing, logit_scale)
        needs = ctx.needs_input_grad
        need = (needs[0], needs[2], bias is not None and needs[3])
        ctx.reduction = reduction
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if reduction == "none":
            # The per-token incoming gradient is needed inside the chunk loop: redo the loop in the backward.
            loss, _, _, _ = _chunked_loss_and_grads(x, target, weight, bias, options, num_chunks, compute_dtype,
                                                    triton, grad_scale, None, False, False, False, None)
            ctx.recompute = (options, num_chunks, compute_dtype, triton, l2_penalty_factor, need)
            ctx.save_for_backward(x, target, weight, bias, grad_scale)
            return loss
        loss, dx, dw, db = _chunked_loss_and_grads(x, target, weight, bias, options, num_chunks, compute_dtype,
                                                   triton, grad_scale, None, *need, l2_penalty_factor)
        # Keep the gradients in their final dtypes: the float32 weight gradient would double the stored memory.
        ctx.save_for_backward(dx, dw.to(weight.dtype) if dw is not None else None,
                              db.to(bias.dtype) if db is not None else None)
        return (loss.sum() * grad_scale).squeeze(0)

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, dloss):
        if ctx.reduction == "none":
            x, target, weight, bias, grad_scale = ctx.saved_tensors
            options, num_chunks, compute_dtype, triton, l2_penalty_factor, need = ctx.recompute
            _, dx, dw, db = _chunked_loss_and_grads(x, target, weight, bias, options, num_chunks, compute_dtype,
                                                    triton, grad_scale, dloss.float().reshape(-1).contiguous(),
                                                    *need, l2_penalty_factor)
            dw = dw.to(ctx.dtypes[1]) if dw is not None else None
            db = db.to(ctx.dtypes[2]) if db is not None else None
        else:
            dx, dw, db = ctx.saved_tensors
            dx, dw, db = (g * dloss if g is not None else None for g in (dx, dw, db))
        return dx, None, dw, db, None, None, None, None, None, None


def fused_linear_cross_entropy_loss(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    num_chunks: int = 8,
    reduction: str = "mean",
    use_l2warp: bool = False,
    l2_penalty_factor: float = 1e-4,
) -> torch.Tensor:
    """Cross-entropy of the logits ``x @ weight.T + bias`` against ``target``, never holding all the logits.

    Args:
        x: hidden states [..., H], float32 / float16 / bfloat16.
        target: integer class indices shaped like ``x.shape[:-1]`` or flattened [N]; ``ignore_index`` rows are not
            counted.
        weight: the LM head [V, H]; bias: [V] or None.
        ignore_index, label_smoothing, logit_scale, reduction: as in ``fla.modules.cross_entropy_loss``; 'mean'
            divides by the number of counted tokens over all chunks (0 loss and zero gradients when there is none).
        num_chunks: the tokens are processed in this many chunks (more chunks: less memory, smaller matmuls).
        use_l2warp: add FLA's L2-warp gradient (``l2_penalty_factor * max_logit / N`` on each token's largest raw
            logit, N counting all tokens); it changes the gradients only, not the returned loss.

    Returns:
        float32 loss: a scalar for 'mean' / 'sum', shaped like ``target`` for 'none'.
    """
    check_tensor("x", x, dtype=FLOAT_DTYPES)
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dimension (the hidden size), got a 0-dim tensor")
    H = x.shape[-1]
    check_tensor("weight", weight, dtype=FLOAT_DTYPES, device=x.device)
    if weight.ndim != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must have shape [V, H={H}] (H: x's last dimension), got {list(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1), got shape [0, H]")
    if bias is not None:
        check_tensor("bias", bias, dtype=FLOAT_DTYPES, shape=(weight.shape[0],), device=x.device)
    check_loss_options(ignore_index, reduction, label_smoothing, logit_scale)
    check_positive_int("num_chunks", num_chunks)
    if use_l2warp:
        check_non_negative_float("l2_penalty_factor", l2_penalty_factor)
    target_shape = target.shape if isinstance(target, torch.Tensor) else None
    target = flatten_target(target, x.shape[:-1], x.device, "x")
    x2d = x.reshape(-1, H)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    loss = FusedLinearCrossEntropyFunction.apply(
        x2d, target, weight, bias, ignore_index, float(label_smoothing), float(logit_scale), num_chunks, reduction,
        float(l2_penalty_factor) if use_l2warp else None,
    )
    return loss.reshape(target_shape) if reduction == "none" else loss


class FusedLinearCrossEntropyLoss(nn.Module):
    """Chunked LM-head cross-entropy: ``forward(x [..., H], target, weight [V, H], bias=None) -> loss`` (float32).

    The constructor fixes the options of ``fused_linear_cross_entropy_loss``. flame builds it as
    ``FusedLinearCrossEntropyLoss(num_chunks=8 // tp)`` and assigns it to ``model.criterion``; the model then
    passes its final hidden states, the shifted labels and ``lm_head.weight`` / ``lm_head.bias``.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        logit_scale: float = 1.0,
        num_chunks: int = 8,
        reduction: str = "mean",
        use_l2warp: bool = False,
        l2_penalty_factor: float = 1e-4,
    ):
        super().__init__()
        check_loss_options(ignore_index, reduction, label_smoothing, logit_scale)
        check_positive_int("num_chunks", num_chunks)
        check_non_negative_float("l2_penalty_factor", l2_penalty_factor)
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.logit_scale = float(logit_scale)
        self.num_chunks = num_chunks
        self.reduction = reduction
        self.use_l2warp = bool(use_l2warp)
        self.l2_penalty_factor = float(l2_penalty_factor)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"logit_scale={self.logit_scale}, num_chunks={self.num_chunks}, reduction={self.reduction!r}, "
                f"use_l2warp={self.use_l2warp}")

    def forward(self, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_linear_cross_entropy_loss(
            x, target, weight, bias, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale, num_chunks=self.num_chunks, reduction=self.reduction,
            use_l2warp=self.use_l2warp, l2_penalty_factor=self.l2_penalty_factor,
        )


def _define_linear_loss_parallel():
    """Import torch's DTensor API and define ``LinearLossParallel`` (and its helper) against it."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ParallelStyle

    class _SumGradOverGroup(torch.autograd.Function):
        """Identity whose backward sums the gradient over a process group (the ranks' partial gradients of a weight
        that every rank holds whole)."""

        @staticmethod
        def forward(ctx, t, group):
            ctx.group = group
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=ctx.group)
            return grad, None

    class LinearLossParallel(ParallelStyle):
        """Tensor-parallel style for a ``FusedLinearCrossEntropyLoss`` criterion: a ``parallelize_module`` plan entry,
        e.g. ``{"criterion": LinearLossParallel()}`` beside ``{"lm_head": PrepareModuleWeight(layouts=Replicate())}``
        as in flame. Each rank of the (1-D) mesh computes the loss of its slice of the sequence with the whole head:

        - ``x`` [B, T, H]: a DTensor is redistributed to ``Shard(sequence_dim)``; a plain tensor is taken to be this
          rank's shard already (the output of a sequence-parallel norm).
        - ``target`` [B, T]: a DTensor is redistributed to ``Shard(sequence_dim)``; a plain tensor is taken to be the
          full labels, replicated on every rank, and this rank keeps its slice (``torch.chunk`` along the sequence).
        - ``weight`` [V, H] and ``bias``: a DTensor is redistributed to ``Replicate()`` (an all-gather of a
          column-sharded head); a plain tensor is taken as replicated. Their gradients are summed over the ranks, so
          every replica (or shard) receives the gradient of the whole batch.

        The returned loss is the same on every rank and equals the unsharded loss: for 'mean' the sum over the ranks
        divided by the number of counted tokens over the ranks, for 'sum' the sum over the ranks (two scalar
        all-reduces). Its gradient flows into each rank's own shard only, so that the gradients of x, weight and bias
        are those of the unsharded loss. With 'none' each rank returns the per-token losses of its shard.
        The criterion must be called positionally, ``criterion(x, target, weight, bias)``; the sequence length should
        be divisible by the mesh size. With ``use_l2warp`` the penalty's token count N is the rank's local one.
        """

        def __init__(self, *, sequence_dim: int = 1):
            super().__init__()
            if isinstance(sequence_dim, bool) or not isinstance(sequence_dim, int) or sequence_dim < 0:
                raise ValueError(
                    f"sequence_dim must be a non-negative int (a dimension of x and target), got {sequence_dim!r}")
            self.sequence_dim = sequence_dim

        def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
            if device_mesh.ndim != 1:
                raise ValueError(
                    f"LinearLossParallel needs a 1-D (tensor-parallel) mesh, got {device_mesh.ndim} dimensions")
            module.register_forward_pre_hook(partial(self._prepare_input, device_mesh=device_mesh))
            module.register_forward_hook(partial(self._combine_output, device_mesh=device_mesh))
            return module

        @staticmethod
        def _local(t, device_mesh, plain_placement, placement):
            if t is None:
                return None
            if not isinstance(t, DTensor):
                if plain_placement == placement:
                    return t
                t = DTensor.from_local(t, device_mesh, [plain_placement], run_check=False)
            if tuple(t.placements) != (placement,):
                t = t.redistribute(device_mesh, [placement])
            return t.to_local()

        def _prepare_input(self, module, inputs, device_mesh):
            if len(inputs) not in (3, 4):
                raise ValueError(
                    "LinearLossParallel expects the criterion to be called positionally as "
                    "(x, target, weight[, bias]), "
                    f"got {len(inputs)} positional arguments"
                )
            x, target, weight = inputs[:3]
            bias = inputs[3] if len(inputs) == 4 else None
            shard, group = Shard(self.sequence_dim), device_mesh.get_group()
            x = self._local(x, device_mesh, shard, shard)
            target = self._local(target, device_mesh, Replicate(), shard)
            replicate = Replicate()
            weight = _SumGradOverGroup.apply(self._local(weight, device_mesh, replicate, replicate), group)
            if bias is not None:
                bias = _SumGradOverGroup.apply(self._local(bias, device_mesh, replicate, replicate), group)
            return (x, target, weight, bias)

        @staticmethod
        def _combine_output(module, inputs, loss, device_mesh):
            reduction = getattr(module, "reduction", "mean")
            if reduction == "none":
                return loss
            group = device_mesh.get_group()
            if reduction == "sum":
                total = loss.detach().clone()
                dist.all_reduce(total, group=group)
                return loss + (total - loss.detach())
            counted = (inputs[1] != getattr(module, "ignore_index", -100)).sum().float()
            count = counted.clamp(min=1)
            stats = torch.stack([loss.detach().float() * count, counted])  # this rank's loss sum and token count
            dist.all_reduce(stats, group=group)
            total_count = stats[1].clamp(min=1)
            weight = count / total_count  # d(global mean) = (local count / global count) * d(local mean)
            return loss * weight + (stats[0] / total_count - loss.detach() * weight)

    LinearLossParallel.__module__ = __name__
    LinearLossParallel.__qualname__ = "LinearLossParallel"
    return LinearLossParallel


def __getattr__(name: str):
    if name == "LinearLossParallel":
        try:
            cls = _define_linear_loss_parallel()
        except ImportError as e:  # a torch build without distributed support
            raise ImportError(f"LinearLossParallel needs torch.distributed with DTensor support: {e}") from e
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
