"""``parallel_attn``: causal softmax attention over whole sequences (full or sliding window, GQA, packed).

(Placeholder until the Triton kernels and the fast torch path land: runs the float32 reference.)
"""

from __future__ import annotations

from typing import Optional

import torch

from fla.ops.attn.naive import naive_attn


def parallel_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    window_size: Optional[int] = None,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> torch.Tensor:
    """q [B, T, HQ, D], k [B, T, H, D], v [B, T, H, V] -> o [B, T, HQ, V]; see ``fla.ops.attn.naive.naive_attn``."""
    return naive_attn(q, k, v, scale, window_size, cu_seqlens)
