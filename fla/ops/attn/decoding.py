"""``attn_decoding_one_step``: one new query per sequence against a left-padded KV cache.

(Placeholder until the decoding kernel lands: runs the float32 reference.)
"""

from __future__ import annotations

from typing import Optional

import torch

from fla.ops.attn.naive import naive_attn_decoding


def attn_decoding_one_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    window_size: Optional[int] = None,
    seq_start: Optional[torch.LongTensor] = None,
) -> torch.Tensor:
    """q [B, 1, HQ, D], caches k [B, S, H, D] / v [B, S, H, V] (left-padded; row b valid from ``seq_start[b]``)
    -> o [B, 1, HQ, V]; see ``fla.ops.attn.naive.naive_attn_decoding``."""
    return naive_attn_decoding(q, k, v, scale, window_size, seq_start)
