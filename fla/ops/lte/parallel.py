"""``parallel_lte_attn``: LTE attention over whole sequences (training, evaluation, cached prefill).

Query i sees key j iff j <= i and (i - j <= window_size or j is selected) within its sequence (document), where
selected = score > 0 or a sink (the first ``sink_size`` tokens of every sequence), unless ``selected`` is given
(e.g. after the evaluation-time cap ``fla.ops.lte.enforce_buffer_size``). The router score gets the straight-through
gradient ``d score_j = <dL/dv_j, v_j>`` summed over the key/value head's query heads.

Two implementations (the float32 truth is ``fla.ops.lte.naive.naive_lte_attn``):

- Triton (CUDA; ``fla.ops.lte.parallel_kernels``): flash-attention style tiles over the window plus a compacted
  list of the selected keys older than the window, with the score gradient fused into the dk/dv pass. Proven on an
  H200 (``tests/ops/lte``, gpu marker); default on CUDA, ``FLA_BACKEND=torch`` turns it off.
- torch (CPU and ``FLA_BACKEND=torch``): SDPA with the dense [T, T] visibility mask of each key/value head (memory
  B * H * T^2 bytes: fine for CPU-sized models, not for long GPU contexts).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fla.ops.lte.naive import lte_visible_mask, straight_through_gate
from fla.ops.lte.selection import select_tokens
from fla.utils import FLOAT_DTYPES, check_cu_seqlens, check_qkv, check_scale, check_tensor, use_triton


def _lte_sdpa(q, k, v, score, selected, window_size: int, scale: float) -> torch.Tensor:
    """One batch of whole sequences [B, T, H*, D] through SDPA with the dense [B, H, T, T] visibility mask."""
    G = q.shape[2] // k.shape[2]
    visible = lte_visible_mask(selected, window_size).repeat_interleave(G, dim=1)
    v = straight_through_gate(v, score)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(G, dim=1),
                                       v.transpose(1, 2).repeat_interleave(G, dim=1), attn_mask=visible, scale=scale)
    return o.transpose(1, 2)


def parallel_lte_attn_torch(q, k, v, score, selected, window_size: int, scale: float,
                            cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch path: SDPA over the dense visibility mask, one call per packed sequence (memory of the largest
    L^2, never of the packed total); differentiable in q, k, v and score. o in q.dtype."""
    if cu_seqlens is None:
        return _lte_sdpa(q, k, v, score, selected, window_size, scale).contiguous()
    bounds = cu_seqlens.tolist()
    pieces = [_lte_sdpa(q[:, s:e], k[:, s:e], v[:, s:e], score[:, s:e], selected[:, s:e], window_size, scale)
              for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(pieces, 1) if pieces else q.new_zeros(*q.shape[:3], v.shape[-1])


def _check_inputs(q, k, v, score, selected, window_size, sink_size, scale, cu_seqlens) -> None:
    check_qkv(q, k, v)
    B, T, _, _ = q.shape
    H = k.shape[2]
    if k.shape[1] != T:
        raise ValueError(f"k must have the length T={T} of q, got {list(k.shape)}")
    check_tensor("score", score, ndim=3, dtype=FLOAT_DTYPES, shape=(B, T, H), device=q.device)
    if selected is not None:
        check_tensor("selected", selected, dtype=torch.bool, shape=(B, T, H), device=q.device)
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
        raise ValueError(f"window_size must be an int >= 0 (the current token plus window_size previous ones), "
                         f"got {window_size!r}")
    if isinstance(sink_size, bool) or not isinstance(sink_size, int) or sink_size < 0:
        raise ValueError(f"sink_size must be an int >= 0, got {sink_size!r}")
    check_scale(scale)
    check_cu_seqlens(cu_seqlens, q)


def parallel_lte_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score: torch.Tensor,
    window_size: int,
    sink_size: int = 0,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    selected: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """LTE attention (see the module docstring).

    Args:
        q: [B, T, HQ, D]; k: [B, T, H, D]; v: [B, T, H, V] (one float dtype; HQ a multiple of H).
        score: [B, T, H] router scores (any float dtype); receives the straight-through gradient.
        window_size: w >= 0: query i sees keys i - w .. i (w + 1 keys) plus the selected keys before them.
        sink_size: the first ``sink_size`` tokens of every sequence are always selected.
        scale: default D ** -0.5. cu_seqlens: [N + 1] packed documents (B = 1); never attended across.
        selected: [B, T, H] bool overriding the rule score > 0 or sink (no gradient).

    Returns:
        o [B, T, HQ, V] in q.dtype.
    """
    _check_inputs(q, k, v, score, selected, window_size, sink_size, scale, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if selected is None:
        selected = select_tokens(score.detach(), sink_size, cu_seqlens)
    if use_triton(q):
        from fla.ops.lte.parallel_kernels import lte_attn_triton

        return lte_attn_triton(q, k, v, score, selected, window_size, scale, cu_seqlens)
    return parallel_lte_attn_torch(q, k, v, score, selected, window_size, scale, cu_seqlens)
