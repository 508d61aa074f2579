"""``parallel_lte_attn``: LTE attention over whole sequences (training, evaluation, cached prefill).

Query i sees key j iff j <= i and (i - j <= window_size or j is selected) within its sequence (document), where
selected = score > 0 or a sink (the first ``sink_size`` tokens of every sequence), unless ``selected`` is given
(e.g. after the evaluation-time cap ``fla.ops.lte.enforce_buffer_size``). The router score gets the straight-through
gradient ``d score_j = <dL/dv_j, v_j>`` summed over the key/value head's query heads.

Two implementations (the float32 truth is ``fla.ops.lte.naive.naive_lte_attn``):

- Triton (CUDA; ``fla.ops.lte.parallel_kernels``): flash-attention style tiles over the window plus a compacted
  list of the selected keys older than the window, with the score gradient fused into the dk/dv pass. Proven on an
  H200 (``tests/ops/lte``, gpu marker); default on CUDA, ``FLA_BACKEND=torch`` turns it off.
- torch (CPU and ``FLA_BACKEND=torch``): SDPA in blocks of query rows, each over its window's keys plus the
  selected keys before them (gathered per key/value head), so memory and work grow with T (rows + w + selected),
  not T^2.
"""

from __future__ import annotations

from typing import Optional

import torch

from fla.ops.lte.naive import straight_through_gate
from fla.ops.lte.selection import select_tokens
from fla.ops.utils.sdpa import blocked_sdpa, query_block_rows
from fla.utils import FLOAT_DTYPES, check_cu_seqlens, check_qkv, check_scale, check_tensor, use_triton


def _lte_sdpa(q, k, v, score, selected, window_size: int, scale: float,
              query_block: Optional[int] = None) -> torch.Tensor:
    """One batch of whole sequences [B, T, H*, D] through SDPA, in blocks of query rows.

    Block [a, b) attends to the keys [lo, b) with lo = a - w (causal, window or selected), and before lo only to the
    selected keys, gathered per (sequence, kv head) in position order and padded to the largest count (a padded key
    is masked). Memory and work O(T (rows + w + selected)) instead of O(T^2); one block (rows >= T) is the plain
    dense-mask call."""
    B, T, HQ, _ = q.shape
    v = straight_through_gate(v, score)
    rows = query_block or query_block_rows(B * HQ, T)
    sel_t = selected.permute(0, 2, 1)  # [B, H, T]
    order = torch.sort((~selected).to(torch.uint8), dim=1, stable=True).indices  # selected positions first, in order
    count = selected.cumsum(1)  # [B, T, H]: selected keys at or before t
    pos = torch.arange(T, device=q.device)

    def block_keys(a: int, b: int):
        lo = max(a - window_size, 0)
        i, j = pos[a:b, None], pos[None, lo:b]
        mask = (j <= i) & ((i - j <= window_size) | sel_t[:, :, None, lo:b])  # [B, H, L, b - lo]
        n_old = count[:, lo - 1] if lo > 0 else None  # [B, H]: selected keys before lo
        m = int(n_old.max()) if n_old is not None else 0
        if not m:
            return lo, b, None, mask
        real = torch.arange(m, device=q.device)[None, None, :] < n_old[..., None]  # [B, H, m]
        return lo, b, order[:, :m], torch.cat([real[:, :, None, :].expand(-1, -1, b - a, -1), mask], -1)

    return blocked_sdpa(q, k, v, scale, rows, block_keys)


def parallel_lte_attn_torch(q, k, v, score, selected, window_size: int, scale: float,
                            cu_seqlens: Optional[torch.Tensor] = None,
                            query_block: Optional[int] = None) -> torch.Tensor:
    """Torch path: SDPA over the visible keys, one call per packed sequence (memory of the largest sequence, never of
    the packed total), in blocks of ``query_block`` query rows (default ``fla.ops.utils.sdpa.query_block_rows``);
    differentiable in q, k, v and score. o in q.dtype."""
    if cu_seqlens is None:
        return _lte_sdpa(q, k, v, score, selected, window_size, scale, query_block).contiguous()
    bounds = cu_seqlens.tolist()
    pieces = [_lte_sdpa(q[:, s:e], k[:, s:e], v[:, s:e], score[:, s:e], selected[:, s:e], window_size, scale,
                        query_block)
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
