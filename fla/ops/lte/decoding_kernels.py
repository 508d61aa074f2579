"""Triton path of one LTE decoding step (``fla.ops.lte.decoding.lte_decoding_one_step``): softmax attention over
the cache's valid slots, run by the softmax-attention decode kernel (``fla.ops.attn.decoding_kernels``) with its
per-slot ``valid`` mask and neither left padding nor window.

That kernel's split count, tiles and single-launch path apply unchanged: at the paper's shape (B8, HQ16, H16, D64,
S = 768 + 1 + 512) the S slots are cut into three splits (384 programs, about 3 per SM on an H200) merged by the
combine kernel: 24 us a step on an H200 against 36 us for one split. Slots with ``valid`` False are masked loads
and -inf logits; a (row, head) with no valid slot gets zeros.

q [B, 1, HQ, D]; k_cache [B, S, H, D], v_cache [B, S, H, V] (any strides along B and S, heads and features
contiguous: the layout of ``fla.ops.lte.cache.lte_empty_cache`` and of its slices along B or S, which are read in
place; other layouts are copied); valid [B, S, H] bool (any strides, never copied).
"""

from __future__ import annotations

from typing import Optional

import torch

from fla.ops.attn.decoding_kernels import attn_decoding_fwd


def lte_decoding_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor,
                     scale: float, _num_splits: Optional[int] = None) -> torch.Tensor:
    """q [B, 1, HQ, D], k_cache [B, S, H, D], v_cache [B, S, H, V], valid [B, S, H] bool -> o [B, 1, HQ, V] in
    q.dtype (arguments checked by the caller). ``_num_splits`` (tests) forces about that many splits of the S slots;
    1 is the single-launch path."""
    return attn_decoding_fwd(q, k_cache, v_cache, scale, None, None, valid=valid, _num_splits=_num_splits)
