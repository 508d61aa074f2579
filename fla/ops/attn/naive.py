"""Torch references of causal softmax attention (full or sliding window, GQA, packed sequences) and of one decoding
step against a left-padded cache. Float32, obvious, slow: the truth for tests.

Window convention (SWA / FLA): with ``window_size = w`` query i sees keys i - w + 1 .. i (w keys, itself included);
``None`` means full causal attention.
"""

from __future__ import annotations

from typing import Optional

import torch


def _attend(q, k, v, scale, window_size, causal_offset: int = 0):
    """One sequence: q [Tq, HQ, D], k [Tk, H, D], v [Tk, H, V] (float32). Query t sits at position
    ``causal_offset + t`` and key s at position s. Returns [Tq, HQ, V]."""
    Tq, HQ, _ = q.shape
    Tk, H, _ = k.shape
    group = HQ // H
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    qpos = torch.arange(Tq, device=q.device)[:, None] + causal_offset
    kpos = torch.arange(Tk, device=q.device)[None, :]
    allowed = kpos <= qpos
    if window_size is not None:
        allowed = allowed & (qpos - kpos < window_size)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no key (impossible when causal) gives 0
    return torch.einsum("hqk,khv->qhv", p, v)


def naive_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    window_size: Optional[int] = None,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> torch.Tensor:
    """Causal attention in float32 (differentiable by autograd).

    Args:
        q: [B, T, HQ, D]; k: [B, T, H, D]; v: [B, T, H, V]; HQ a multiple of H (grouped-query attention).
        scale: default D ** -0.5. window_size: w keys per query (itself included) or None (full causal).
        cu_seqlens: [N + 1] offsets of packed sequences (B = 1); attention never crosses a sequence boundary.

    Returns:
        o [B, T, HQ, V] in q.dtype.
    """
    B, T, HQ, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    if cu_seqlens is None:
        out = torch.stack([_attend(qf[b], kf[b], vf[b], scale, window_size) for b in range(B)], 0)
    else:
        bounds = cu_seqlens.tolist()
        pieces = [_attend(qf[0, s:e], kf[0, s:e], vf[0, s:e], scale, window_size)
                  for s, e in zip(bounds[:-1], bounds[1:])]
        out = torch.cat(pieces, 0)[None]
    return out.to(q.dtype)


def naive_attn_decoding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    window_size: Optional[int] = None,
    seq_start: Optional[torch.LongTensor] = None,
) -> torch.Tensor:
    """One new query per sequence against its cache, in float32.

    Args:
        q: [B, 1, HQ, D], the newest token of each sequence (its key and value are already the cache's last entry).
        k: [B, S, H, D], v: [B, S, H, V]: the caches, left-padded: row b's valid keys are ``seq_start[b] .. S - 1``.
        seq_start: [B] first valid cache index per row (None: all valid).
        window_size: the query sees only the last ``window_size`` valid keys (itself included) when given.

    Returns:
        o [B, 1, HQ, V] in q.dtype.
    """
    B, _, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qf, kf, vf = q.float()[:, 0], k.float(), v.float()
    group = HQ // H
    scores = torch.einsum("bhd,bshd->bhs", qf, kf.repeat_interleave(group, dim=2)) * scale
    pos = torch.arange(S, device=q.device)[None, :]
    start = torch.zeros(B, dtype=torch.long, device=q.device) if seq_start is None else seq_start.long()
    allowed = pos >= start[:, None]
    if window_size is not None:
        allowed = allowed & (pos > S - 1 - window_size)
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhs,bshv->bhv", p, vf.repeat_interleave(group, dim=2))
    return o[:, None].to(q.dtype)
