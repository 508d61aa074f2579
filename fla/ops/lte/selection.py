"""Which keys an LTE head keeps beyond its window: the selection rule, sinks, and the evaluation-time buffer cap.

A key is *selected* when its router score is positive or it is a sink (one of the first ``sink_size`` tokens of its
sequence). Query i then sees key j iff j <= i and (i - j <= window_size or j is selected) (``fla.ops.lte.naive``).

Sequences are either the rows of a [B, T] batch or, with ``cu_seqlens`` (B = 1), the packed documents; sinks are
counted per sequence (per document), never across a boundary. Positions are integers (the reference builds them in
bf16 and marks the wrong sinks past position 256).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def sequence_bounds(B: int, T: int, cu_seqlens: Optional[torch.Tensor]) -> List[Tuple[int, int, int]]:
    """(row, start, end) of every sequence: the B rows of [B, T], or the documents of a packed [1, T] batch."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]


def sink_mask(B: int, T: int, sink_size: int, cu_seqlens: Optional[torch.Tensor] = None,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """[B, T] bool: True at the first ``sink_size`` tokens of every sequence (document)."""
    pos = torch.arange(T, device=device)
    if cu_seqlens is None:
        return (pos < sink_size)[None].expand(B, T).clone()
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    doc = torch.searchsorted(cu[1:], pos, right=True)  # document index of each packed token
    return ((pos - cu[doc]) < sink_size)[None]


def select_tokens(score: torch.Tensor, sink_size: int = 0, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """score [B, T, H] -> selected [B, T, H] bool: score > 0, or a sink (first ``sink_size`` tokens per sequence)."""
    B, T, H = score.shape
    selected = score > 0
    if sink_size > 0:
        selected = selected | sink_mask(B, T, sink_size, cu_seqlens, score.device)[..., None]
    return selected


def enforce_buffer_size(score: torch.Tensor, selected: torch.Tensor, buffer_size: int, window_size: int,
                        sink_size: int = 0, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference's evaluation-time cap (its ``naive_enforce_buffer_size``): emulate the decode buffer at the
    end of each sequence and apply it to every query of that sequence.

    For a sequence of length L, keys before ``window_start = max(L - window_size - 1, 0)`` (outside the last
    query's window) are pruned to the sinks plus the top ``buffer_size - num_sinks`` selected non-sink keys by
    score, per head; the cap therefore includes the sinks. Keys inside the last window are untouched.

    Args:
        score: [B, T, H] float router scores. selected: [B, T, H] bool (``select_tokens``).
        buffer_size: b >= 0. window_size: w (the current token plus w previous ones). sink_size: s >= 0.
        cu_seqlens: [N + 1] packed documents (B = 1), each capped on its own.

    Returns:
        a new [B, T, H] bool tensor; ``selected`` is not modified.
    """
    B, T, H = score.shape
    out = selected.clone()
    for row, start, end in sequence_bounds(B, T, cu_seqlens):
        L = end - start
        n_sinks = min(sink_size, L)
        window_start = max(L - window_size - 1, 0)
        if window_start <= n_sinks:
            continue
        region = slice(start + n_sinks, start + window_start)  # prunable: before the last window, not a sink
        sel = out[row, region]  # [P, H]
        keep = buffer_size - n_sinks
        if keep <= 0:
            out[row, region] = False
            continue
        if int(sel.sum(0).max()) <= keep:
            continue
        masked = score[row, region].float().masked_fill(~sel, float("-inf"))
        top = masked.topk(min(keep, masked.shape[0]), dim=0).indices  # [keep, H]
        kept = torch.zeros_like(sel)
        kept.scatter_(0, top, True)
        out[row, region] = sel & kept
    return out
