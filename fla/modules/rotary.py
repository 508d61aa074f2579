"""Rotary position embeddings (RoPE): the ``RotaryEmbedding`` module and the ``apply_rotary`` function.

GPT-NeoX convention by default ("rotate half": feature i pairs with feature i + dim/2), GPT-J pairs (2i, 2i + 1)
with ``interleaved=True``. Only the first ``dim`` features of each head are rotated; the rest pass through. Angles
are ``position * inv_freq`` in float32 from integer positions, and the rotation runs in float32 whatever the input
dtype (the reference casts its cos/sin tables to the activation dtype; we do not). The output has x's dtype.

``apply_rotary`` dispatches on the input's device (``fla.utils.use_triton``): a Triton kernel that computes cos/sin
on the fly for CUDA tensors (``fla.modules.rotary_kernels``), plain torch ops elsewhere. ``inverse=True`` rotates by
the opposite angle, undoing the rotation at the same positions ("derope" of cached keys).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from fla.ops.utils.index import prepare_position_ids, prepare_sequence_ids
from fla.utils import (
    FLOAT_DTYPES,
    autocast_custom_bwd,
    autocast_custom_fwd,
    check_cu_seqlens,
    check_tensor,
    use_triton,
)

INT_DTYPES = (torch.int32, torch.int64)
Offset = Union[int, torch.Tensor]


def rotary_inv_freq(dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """Float32 [dim // 2]: ``1 / base ** (arange(0, dim, 2) / dim)``."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def _positions(x: torch.Tensor, seqlen_offset: Offset, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """Int64 positions [B or 1, T] of every token of x [B, T, ...] (see ``apply_rotary``)."""
    T = x.shape[1]
    if cu_seqlens is not None:
        pos = prepare_position_ids(cu_seqlens.long())
        if isinstance(seqlen_offset, torch.Tensor):
            pos = pos + seqlen_offset.long()[prepare_sequence_ids(cu_seqlens.long())]
        else:
            pos = pos + seqlen_offset
        return pos[None]
    pos = torch.arange(T, device=x.device, dtype=torch.long)
    if isinstance(seqlen_offset, torch.Tensor):
        return seqlen_offset.long()[:, None] + pos[None]
    return (pos + seqlen_offset)[None]


def rotary_torch(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor, inverse: bool = False,
                 interleaved: bool = False) -> torch.Tensor:
    """Torch path: rotate x [B, T, H, D] at int positions [B or 1, T] with float32 inv_freq [R]; x.dtype output."""
    R = inv_freq.numel()
    angle = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # [B, T, R]
    cos, sin = angle.cos()[:, :, None, :], angle.sin()[:, :, None, :]
    if inverse:
        sin = -sin
    rot = x[..., :2 * R].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    else:
        x1, x2 = rot[..., :R], rot[..., R:]
        y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    y = y.to(x.dtype)
    if 2 * R < x.shape[-1]:
        y = torch.cat([y, x[..., 2 * R:]], -1)
    return y


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, x, inv_freq, offset, offsets, positions, inverse, interleaved):
        from fla.modules.rotary_kernels import rotary_fwd

        ctx.save_for_backward(inv_freq, offsets, positions)
        ctx.offset, ctx.inverse, ctx.interleaved, ctx.x_dtype = offset, inverse, interleaved, x.dtype
        return rotary_fwd(x, inv_freq, offset, offsets, positions, inverse, interleaved)

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, dy):
        from fla.modules.rotary_kernels import rotary_fwd

        inv_freq, offsets, positions = ctx.saved_tensors
        # the rotation is orthogonal: its backward is the inverse rotation of the incoming gradient
        dx = rotary_fwd(dy, inv_freq, ctx.offset, offsets, positions, not ctx.inverse, ctx.interleaved, ctx.x_dtype)
        return dx, None, None, None, None, None, None


def _check_offset(seqlen_offset, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> Offset:
    """Validate seqlen_offset; a 0-d tensor is expanded to one offset per sequence."""
    n = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if isinstance(seqlen_offset, torch.Tensor):
        check_tensor("seqlen_offset", seqlen_offset, ndim=(0, 1), dtype=INT_DTYPES, device=x.device)
        if seqlen_offset.ndim == 0:
            return seqlen_offset.reshape(1).expand(n)
        if seqlen_offset.shape[0] != n:
            what = (f"one per packed sequence (len(cu_seqlens) - 1 = {n})" if cu_seqlens is not None
                    else f"one per batch row (B = {n})")
            raise ValueError(f"seqlen_offset must have shape [{n}], {what}; got {list(seqlen_offset.shape)}")
        return seqlen_offset
    if isinstance(seqlen_offset, bool) or not isinstance(seqlen_offset, int):
        raise ValueError(
            f"seqlen_offset must be an int or an integer tensor, got {type(seqlen_offset).__name__} {seqlen_offset!r}")
    return seqlen_offset


def apply_rotary(
    x: torch.Tensor,
    inv_freq: torch.Tensor,
    seqlen_offset: Offset = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    inverse: bool = False,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate the first ``2 * len(inv_freq)`` features of every head of ``x`` by position-dependent angles.

    Args:
        x: [B, T, H, D], float32 / float16 / bfloat16.
        inv_freq: float32 [R] frequencies (see ``rotary_inv_freq``), 2R <= D; features [2R, D) pass through.
        seqlen_offset: int, or an integer tensor [B] (one per row; [N] with ``cu_seqlens``). Token t of row b has
            position ``seqlen_offset (+ [b]) + t``; offsets may be negative (left-padded cached decoding).
        cu_seqlens: int32/int64 [N + 1] offsets of packed sequences (B must be 1); positions restart at
            ``seqlen_offset (+ [n])`` at each sequence start.
        inverse: rotate by the opposite angle (undoes ``inverse=False`` at the same positions).
        interleaved: GPT-J pairs (2i, 2i + 1) instead of GPT-NeoX pairs (i, i + R).

    Returns:
        [B, T, H, D] in x.dtype (a new tensor; differentiable w.r.t. x).
    """
    check_tensor("x", x, ndim=4, dtype=FLOAT_DTYPES)
    check_tensor("inv_freq", inv_freq, ndim=1, dtype=torch.float32, device=x.device)
    R, D = inv_freq.numel(), x.shape[-1]
    if R == 0 or 2 * R > D:
        raise ValueError(f"the rotary dim 2 * len(inv_freq) = {2 * R} must be in [2, D], but x has head dim D = {D}")
    check_cu_seqlens(cu_seqlens, x)
    seqlen_offset = _check_offset(seqlen_offset, x, cu_seqlens)
    if use_triton(x):
        offsets, positions, offset = None, None, 0
        if cu_seqlens is not None:
            positions = _positions(x, seqlen_offset, cu_seqlens)[0]
        elif isinstance(seqlen_offset, torch.Tensor):
            offsets = seqlen_offset.contiguous()
        else:
            offset = seqlen_offset
        return RotaryFunction.apply(x, inv_freq, offset, offsets, positions, bool(inverse), bool(interleaved))
    return rotary_torch(x, inv_freq, _positions(x, seqlen_offset, cu_seqlens), inverse, interleaved)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of queries and keys over the first ``dim`` features of each head.

    ``forward(q, k, seqlen_offset=0, max_seqlen=None, cu_seqlens=None, inverse=False) -> (q_rot, k_rot)``,
    q [B, T, HQ, D], k [B, T, H, D] (HQ may differ from H), D >= dim. Positions as in ``apply_rotary``.
    ``derope(x, seqlen_offset=0, cu_seqlens=None)`` undoes the rotation of one tensor (cached keys).

    The buffer ``inv_freq`` [dim // 2] is float32 and not persistent (not in the state dict). If a dtype cast
    (``model.to(torch.bfloat16)``) or meta-device construction has spoilt it, the next forward recomputes it.
    """

    inv_freq: torch.Tensor

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, device=None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim must be a positive even int, got {dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 0:
            raise ValueError(f"base must be a number > 0, got {base!r}")
        self.dim, self.base, self.interleaved = dim, float(base), bool(interleaved)
        self.register_buffer("inv_freq", rotary_inv_freq(dim, self.base, device), persistent=False)

    def reset_parameters(self) -> None:
        """Recompute ``inv_freq`` in float32 on its current device (e.g. after ``to_empty`` materialised a module
        built on the meta device)."""
        self.inv_freq = rotary_inv_freq(self.dim, self.base, self.inv_freq.device)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}"

    def _inv_freq(self, x: torch.Tensor) -> torch.Tensor:
        f = self.inv_freq
        if f.is_meta or f.dtype != torch.float32 or f.device != x.device:
            f = rotary_inv_freq(self.dim, self.base, x.device)
            if not self.inv_freq.is_meta and self.inv_freq.device == x.device:
                self.inv_freq = f  # heal a dtype cast once
        return f

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        seqlen_offset: Offset = 0,
        max_seqlen: Optional[int] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        inverse: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (q_rot, k_rot) in q's and k's dtypes. ``max_seqlen`` is accepted for FLA compatibility and
        ignored (angles are computed on the fly, there is no table to size)."""
        check_tensor("q", q, ndim=4, dtype=FLOAT_DTYPES)
        check_tensor("k", k, ndim=4, dtype=FLOAT_DTYPES, device=q.device)
        if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
            raise ValueError(
                f"q [B, T, HQ, D] and k [B, T, H, D] must share B, T and D; got q {list(q.shape)}, k {list(k.shape)}")
        inv_freq = self._inv_freq(q)
        q = apply_rotary(q, inv_freq, seqlen_offset, cu_seqlens, inverse, self.interleaved)
        k = apply_rotary(k, inv_freq, seqlen_offset, cu_seqlens, inverse, self.interleaved)
        return q, k

    def derope(self, x: torch.Tensor, seqlen_offset: Offset = 0,
               cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Undo the rotation of x [B, T, H, D] at positions ``seqlen_offset + t`` (inverse rotation)."""
        check_tensor("x", x, ndim=4, dtype=FLOAT_DTYPES)
        return apply_rotary(x, self._inv_freq(x), seqlen_offset, cu_seqlens, True, self.interleaved)
