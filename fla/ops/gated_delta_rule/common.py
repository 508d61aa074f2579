"""Argument checks shared by the gated delta rule ops (``ValueError`` naming the argument and what is allowed)."""

from __future__ import annotations

from typing import Optional

import torch

from fla.utils import FLOAT_DTYPES, check_cu_seqlens, check_tensor


def check_gdn_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
) -> int:
    """Validate shapes, dtypes and devices; returns N, the number of sequences (and of states).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]; initial_state: [N, H, K, V] or None;
    cu_seqlens: [N + 1] (B = 1) or None (N = B).
    """
    check_tensor("q", q, ndim=4, dtype=FLOAT_DTYPES)
    B, T, H, K = q.shape
    check_tensor("k", k, shape=(B, T, H, K), dtype=FLOAT_DTYPES, device=q.device)
    check_tensor("v", v, shape=(B, T, H, None), dtype=FLOAT_DTYPES, device=q.device)
    check_tensor("g", g, shape=(B, T, H), dtype=FLOAT_DTYPES, device=q.device)
    check_tensor("beta", beta, shape=(B, T, H), dtype=FLOAT_DTYPES, device=q.device)
    check_cu_seqlens(cu_seqlens, q)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(N, H, K, v.shape[-1]), dtype=FLOAT_DTYPES,
                     device=q.device)
    return N
