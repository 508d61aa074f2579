"""Triton kernel for rotary position embeddings (RoPE) on a [B, T, H, D] tensor.

The first ``2 * R`` features of each head are rotated in R pairs, features beyond pass through unchanged. Pair i is
(x[i], x[i + R]) (GPT-NeoX "rotate half") or (x[2i], x[2i + 1]) when interleaved (GPT-J). At position p:

    a = p * inv_freq[i]                (float32; p is an integer position, exact in float32 up to 2^24)
    y1 = x1 * cos(a) - x2 * sin(a)
    y2 = x2 * cos(a) + x1 * sin(a)

The inverse rotation (``INVERSE``) uses -a. It is also the backward of the rotation: the Jacobian is orthogonal, so
dx = R(-a) dy, and the same kernel serves both directions.

Position of token t of row b:  offset + (OFFSETS[b] if given) + (POSITIONS[t] if given, else t).
``POSITIONS`` (B = 1) carries per-token positions of packed sequences (``cu_seqlens``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    X, Y, INV_FREQ, OFFSETS, POSITIONS,
    offset, T, H,
    stride_xb, stride_xt, stride_xh,
    R: tl.constexpr, D: tl.constexpr,
    HAS_OFFSETS: tl.constexpr, HAS_POSITIONS: tl.constexpr, INVERSE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BT: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
):
    i_t, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_h = i_h * BH + tl.arange(0, BH)
    o_r = tl.arange(0, BR)
    m_t, m_h, m_r = o_t < T, o_h < H, o_r < R

    # integer positions first, float32 only for the product with the frequency
    if HAS_POSITIONS:
        pos = tl.load(POSITIONS + o_t, mask=m_t, other=0).to(tl.int64)
    else:
        pos = o_t.to(tl.int64)
    if HAS_OFFSETS:
        pos += tl.load(OFFSETS + i_b).to(tl.int64)
    pos += offset
    inv_freq = tl.load(INV_FREQ + o_r, mask=m_r, other=0.0).to(tl.float32)
    angle = pos.to(tl.float32)[:, None] * inv_freq[None, :]  # [BT, BR]
    cos = tl.cos(angle)[:, None, :]
    sin = tl.sin(angle)[:, None, :]
    if INVERSE:
        sin = -sin

    # [BT, BH, 1] row offsets: int64, as B * T * H * D may exceed 2^31
    row_x = (i_b.to(tl.int64) * stride_xb + o_t.to(tl.int64)[:, None, None] * stride_xt
             + o_h.to(tl.int64)[None, :, None] * stride_xh)
    row_y = ((i_b.to(tl.int64) * T + o_t.to(tl.int64)[:, None, None]) * H + o_h.to(tl.int64)[None, :, None]) * D
    m_row = m_t[:, None, None] & m_h[None, :, None]
    if INTERLEAVED:
        c1 = 2 * o_r
        c2 = 2 * o_r + 1
    else:
        c1 = o_r
        c2 = o_r + R
    m = m_row & m_r[None, None, :]
    x1 = tl.load(X + row_x + c1[None, None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + row_x + c2[None, None, :], mask=m, other=0.0).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    tl.store(Y + row_y + c1[None, None, :], y1.to(Y.dtype.element_ty), mask=m)
    tl.store(Y + row_y + c2[None, None, :], y2.to(Y.dtype.element_ty), mask=m)

    if BP > 0:  # features [2R, D) are not rotated
        o_p = 2 * R + tl.arange(0, BP)
        m_p = m_row & (o_p < D)[None, None, :]
        xp = tl.load(X + row_x + o_p[None, None, :], mask=m_p, other=0.0)
        tl.store(Y + row_y + o_p[None, None, :], xp.to(Y.dtype.element_ty), mask=m_p)


def rotary_fwd(
    x: torch.Tensor,
    inv_freq: torch.Tensor,
    offset: int = 0,
    offsets: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    inverse: bool = False,
    interleaved: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Rotate ``x`` [B, T, H, D] (any strides; last-dim stride 1 is enforced by a copy). Returns a new contiguous
    tensor in ``out_dtype`` (default x.dtype).

    inv_freq: float32 [R] with 2R <= D. offset: int added to every position. offsets: int [B] per-row offsets or
    None. positions: int [T] per-token positions (B must be 1) or None.
    """
    B, T, H, D = x.shape
    R = inv_freq.numel()
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((B, T, H, D), device=x.device, dtype=out_dtype or x.dtype)
    if y.numel() == 0:
        return y
    BR = triton.next_power_of_2(R)
    BP = triton.next_power_of_2(D - 2 * R) if D > 2 * R else 0
    BH = min(triton.next_power_of_2(H), max(1, 2048 // BR))
    BT = max(1, min(triton.next_power_of_2(T), 4096 // (BH * BR)))
    grid = (triton.cdiv(T, BT), B, triton.cdiv(H, BH))
    _rotary_kernel[grid](
        x, y, inv_freq, offsets, positions,
        int(offset), T, H,
        x.stride(0), x.stride(1), x.stride(2),
        R=R, D=D,
        HAS_OFFSETS=offsets is not None, HAS_POSITIONS=positions is not None,
        INVERSE=bool(inverse), INTERLEAVED=bool(interleaved),
        BT=BT, BH=BH, BR=BR, BP=BP,
        num_warps=4 if BT * BH * BR <= 2048 else 8,
    )
    return y
