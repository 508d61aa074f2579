"""``attn_decoding_one_step``: one new query per sequence against a left-padded KV cache.

Two implementations of ``fla.ops.attn.naive.naive_attn_decoding`` (the float32 truth):

- torch path (CPU, and CUDA with ``FLA_BACKEND=torch``): the reference math vectorised in float32, with GQA by
  reshaping the query heads into [B, H, G] groups (no repeat of the cache).
- Triton path (``fla.ops.attn.decoding_kernels``): split-K over the visible keys, one program per (row, kv head,
  split) with the G query heads of the group as the rows of ``tl.dot`` (each K/V block read once per group), online
  softmax in float32, partials merged by a combine kernel when there is more than one split. Default on CUDA.

Cache convention: row b's valid keys are ``seq_start[b] .. S - 1`` (left padding); the newest token's key and value
are already the last cache entry. With ``window_size = w`` the query sees only the last w valid keys. A row with
no valid key returns zeros.
"""

from __future__ import annotations

from typing import Optional

import torch

from fla.ops.attn.parallel import _check_window
from fla.utils import check_qkv, check_scale, check_tensor, use_triton


def attn_decoding_one_step_torch(q, k, v, scale: float, window_size: Optional[int] = None,
                                 seq_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch path; o [B, 1, HQ, V] in q.dtype."""
    B, _, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    G = HQ // H
    qf = q.float().reshape(B, H, G, D)
    scores = torch.einsum("bhgd,bshd->bhgs", qf, k.float()) * scale
    pos = torch.arange(S, device=q.device)
    if seq_start is not None:
        allowed = pos[None, :] >= seq_start.long()[:, None]
    else:
        allowed = torch.ones(B, S, dtype=torch.bool, device=q.device)
    if window_size is not None:
        allowed = allowed & (pos > S - 1 - window_size)[None, :]
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhgs,bshv->bhgv", p, v.float())
    return o.reshape(B, 1, HQ, -1).to(q.dtype)


def attn_decoding_one_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    window_size: Optional[int] = None,
    seq_start: Optional[torch.LongTensor] = None,
) -> torch.Tensor:
    """One decoding step.

    Args:
        q: [B, 1, HQ, D]; k: [B, S, H, D], v: [B, S, H, V]: left-padded caches, one float dtype; HQ a multiple of H.
        scale: default D ** -0.5.
        window_size: None or w >= 1: only the last w valid keys (the newest included) are seen.
        seq_start: [B] int32 or int64 first valid cache index per row (None: all valid); used as given, no copy.

    Returns:
        o [B, 1, HQ, V] in q.dtype.

    CUDA tensors take the Triton kernel, CPU tensors the torch path (``FLA_BACKEND`` overrides).
    """
    check_qkv(q, k, v, time_dim_name="S")
    if q.shape[1] != 1:
        raise ValueError(f"q must hold one token per sequence, shape [B, 1, HQ, D], got {list(q.shape)}")
    _check_window(window_size)
    check_scale(scale)
    if seq_start is not None:
        check_tensor("seq_start", seq_start, ndim=1, dtype=(torch.int32, torch.int64), shape=(q.shape[0],),
                     device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if use_triton(q):
        from fla.ops.attn.decoding_kernels import attn_decoding_fwd

        return attn_decoding_fwd(q, k, v, scale, window_size, seq_start)
    return attn_decoding_one_step_torch(q, k, v, scale, window_size, seq_start)
