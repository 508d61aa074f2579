"""Float32 dense-mask reference of LTE attention (the truth for tests).

Query i sees key j iff j <= i and (i - j <= window_size or selected_j), within one sequence (document). With
``window_size = w`` a query sees its own token plus the w previous ones (w + 1 keys): the LTE convention, one more
than sliding-window attention's. Scores reach the loss only through the straight-through gate gradient
``d score_j = <dL/dv_j, v_j>`` summed over the key/value head's query heads (the reference's
``DifferentiableMaskingFunction``).
"""

from __future__ import annotations

from typing import Optional

import torch

from fla.ops.lte.selection import select_tokens, sequence_bounds


def lte_visible_mask(selected: torch.Tensor, window_size: int,
                     cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """selected [B, T, H] bool -> visible [B, H, T(query), T(key)] bool."""
    B, T, H = selected.shape
    pos = torch.arange(T, device=selected.device)
    i, j = pos[:, None], pos[None, :]
    same_doc = torch.ones(T, T, dtype=torch.bool, device=selected.device)
    if cu_seqlens is not None:
        doc = torch.zeros(T, dtype=torch.long, device=selected.device)
        for n, (_, s, e) in enumerate(sequence_bounds(1, T, cu_seqlens)):
            doc[s:e] = n
        same_doc = doc[:, None] == doc[None, :]
    base = (j <= i) & same_doc
    window = base & (i - j <= window_size)
    return window[None, None] | (base[None, None] & selected.permute(0, 2, 1)[:, :, None, :])


def straight_through_gate(v: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Identity on v whose gradient w.r.t. score [B, T, H] is <dL/dv, v> per token and head."""
    gate = 1.0 + (score - score.detach())
    return v * gate[..., None].to(v.dtype)


def naive_lte_attn(
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
    """LTE attention in float32, differentiable in q, k, v and score.

    Args:
        q: [B, T, HQ, D]; k: [B, T, H, D]; v: [B, T, H, V]; score: [B, T, H] (router scores, any float dtype).
        window_size: w >= 0 (query i sees i - w .. i plus the selected keys before). sink_size: first tokens of
        every sequence that are always selected. scale: default D ** -0.5. cu_seqlens: [N + 1] packed documents.
        selected: [B, T, H] bool overriding ``select_tokens(score, sink_size, cu_seqlens)`` (e.g. after
        ``enforce_buffer_size``).

    Returns:
        o [B, T, HQ, V] in q.dtype.
    """
    B, T, HQ, D = q.shape
    H = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if selected is None:
        selected = select_tokens(score.detach(), sink_size, cu_seqlens)
    visible = lte_visible_mask(selected, window_size, cu_seqlens).repeat_interleave(HQ // H, dim=1)
    qf, kf = q.float(), k.float()
    vf = straight_through_gate(v.float(), score.float())
    kf = kf.repeat_interleave(HQ // H, dim=2)
    vf = vf.repeat_interleave(HQ // H, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhv->bqhv", p, vf).to(q.dtype)
