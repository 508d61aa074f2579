"""Float32 reference of Native Sparse Attention (NSA): one query, one kv-head group at a time. Slow and obvious;
the truth for the tests of ``parallel_nsa`` and ``nsa_decoding_one_step``.

For a query at absolute position P of its sequence (queries are the **last** T_q of the T_k key tokens, so
P = T_k - T_q + i), block size BS, S = ``block_counts``, window w, group size G = HQ / H (query head hq uses kv
head hq // G):

1. compression: k_c, v_c = mean of k, v over block c = tokens [c BS, (c + 1) BS); the NC = (P + 1) // BS complete
   blocks are visible; o_cmp = softmax_c(scale q . k_c) v_c, or 0 when NC = 0;
2. selection, shared by the G query heads of a kv head: with IC = P // BS (the current block), blocks c < IC score
   I_c = sum over the group of the compression probabilities; blocks 0, IC - 1 and IC are forced (they rank above
   every other block: IC first, then IC - 1, then 0); blocks c > IC cannot be chosen; the S best blocks are
   selected (fewer when fewer exist; -1 pads the index list);
3. selected attention: softmax attention over the tokens j <= P of the selected blocks;
4. sliding window: softmax attention over the w tokens P - w + 1 .. P (w = 0 or None: no window branch);

o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa (a branch whose gate is None is left out).
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

CuSeqlens = Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def split_cu_seqlens(cu_seqlens: CuSeqlens) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(cu_q, cu_k) from None, one tensor (T_q = T_k) or a (cu_q, cu_k) pair."""
    if cu_seqlens is None:
        return None, None
    if isinstance(cu_seqlens, (tuple, list)):
        return cu_seqlens[0], cu_seqlens[1]
    return cu_seqlens, cu_seqlens


def sequence_bounds(q: torch.Tensor, k: torch.Tensor, cu_seqlens: CuSeqlens) -> List[Tuple[int, int, int, int, int]]:
    """[(row, q_start, q_end, k_start, k_end)] of every sequence: dense rows or packed sequences (B = 1)."""
    cu_q, cu_k = split_cu_seqlens(cu_seqlens)
    if cu_q is None:
        return [(b, 0, q.shape[1], 0, k.shape[1]) for b in range(q.shape[0])]
    bq, bk = cu_q.tolist(), cu_k.tolist()
    return [(0, bq[n], bq[n + 1], bk[n], bk[n + 1]) for n in range(len(bq) - 1)]


def _forced_rank(c: int, ic: int, group: int) -> Optional[float]:
    if c == ic:
        return group + 2.0
    if c == ic - 1:
        return group + 1.0
    if c == 0:
        return float(group)
    return None


def _select_blocks(probs: torch.Tensor, ic: int, group: int, block_counts: int) -> List[int]:
    """probs [G, NC] compression probabilities of one group; returns the selected block ids, ascending."""
    scores = []
    for c in range(ic + 1):
        forced = _forced_rank(c, ic, group)
        scores.append((forced if forced is not None else float(probs[:, c].sum()), c))
    scores.sort(key=lambda s: -s[0])
    return sorted(c for _, c in scores[:block_counts])


def _one_query(q, k, v, P, scale, block_size, block_counts, window_size, chosen=None):
    """q [G, D] of one kv-head group at position P; k [Tk, D], v [Tk, V] of its kv head (float32).
    Returns (o_cmp, o_slc, o_swa [G, V], selected block ids)."""
    G = q.shape[0]
    nc, ic = (P + 1) // block_size, P // block_size
    if nc > 0:
        k_cmp = torch.stack([k[c * block_size:(c + 1) * block_size].mean(0) for c in range(nc)])
        v_cmp = torch.stack([v[c * block_size:(c + 1) * block_size].mean(0) for c in range(nc)])
        p = torch.softmax(q @ k_cmp.T * scale, dim=-1)
        o_cmp = p @ v_cmp
    else:
        p = q.new_zeros(G, 0)
        o_cmp = q.new_zeros(G, v.shape[-1])
    if chosen is None:
        chosen = _select_blocks(p.detach(), ic, G, block_counts)
    keys = [j for c in sorted(set(chosen)) if c >= 0 for j in range(c * block_size, (c + 1) * block_size) if j <= P]
    keys = torch.tensor(keys, dtype=torch.long, device=q.device)
    o_slc = torch.softmax(q @ k[keys].T * scale, dim=-1) @ v[keys] if keys.numel() else q.new_zeros(G, v.shape[-1])
    o_swa = None
    if window_size:
        lo = max(0, P - window_size + 1)
        o_swa = torch.softmax(q @ k[lo:P + 1].T * scale, dim=-1) @ v[lo:P + 1]
    return o_cmp, o_slc, o_swa, chosen


def naive_nsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cmp: Optional[torch.Tensor] = None,
    g_slc: Optional[torch.Tensor] = None,
    g_swa: Optional[torch.Tensor] = None,
    block_counts: int = 16,
    block_size: int = 64,
    window_size: Optional[int] = 512,
    scale: Optional[float] = None,
    cu_seqlens: CuSeqlens = None,
    block_indices: Optional[torch.Tensor] = None,
    return_block_indices: bool = False,
):
    """NSA in float32, one query and kv-head group at a time (differentiable by autograd, except the selection).

    Args:
        q: [B, T_q, HQ, D]; k: [B, T_k, H, D]; v: [B, T_k, H, V]; T_q <= T_k (queries are the last T_q tokens).
        g_cmp, g_slc, g_swa: [B, T_q, HQ] branch gates (None: branch left out).
        block_counts: S selected blocks per query and kv head. block_size: BS. window_size: w keys (0/None: none).
        scale: default D ** -0.5.
        cu_seqlens: packed sequences (B = 1): a tensor [N + 1] (T_q = T_k) or a pair (cu_q, cu_k).
        block_indices: [B, T_q, H, S'] int, -1 = no block: use these blocks instead of the top-k selection.
        return_block_indices: also return the selected blocks [B, T_q, H, S] (ascending, -1 padded).

    Returns:
        o [B, T_q, HQ, V] in q.dtype (and the block indices when asked).
    """
    B, Tq, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    scale = D ** -0.5 if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    rows = [[None] * Tq for _ in range(B)]
    chosen_all = torch.full((B, Tq, H, block_counts), -1, dtype=torch.long)
    for b, qs, qe, ks, ke in sequence_bounds(q, k, cu_seqlens):
        offset = (ke - ks) - (qe - qs)
        for i in range(qe - qs):
            P = offset + i
            heads = []
            for h in range(H):
                given = None
                if block_indices is not None:
                    given = [int(c) for c in block_indices[b, qs + i, h].tolist()]
                o_cmp, o_slc, o_swa, chosen = _one_query(
                    qf[b, qs + i, h * G:(h + 1) * G], kf[b, ks:ke, h], vf[b, ks:ke, h], P, scale, block_size,
                    block_counts, window_size, given)
                if block_indices is None:
                    chosen_all[b, qs + i, h, :len(chosen)] = torch.tensor(chosen, dtype=torch.long)
                sl = slice(h * G, (h + 1) * G)
                o = 0
                if g_cmp is not None:
                    o = o + g_cmp[b, qs + i, sl].float()[:, None] * o_cmp
                if g_slc is not None:
                    o = o + g_slc[b, qs + i, sl].float()[:, None] * o_slc
                if g_swa is not None and o_swa is not None:
                    o = o + g_swa[b, qs + i, sl].float()[:, None] * o_swa
                if not isinstance(o, torch.Tensor):
                    o = qf.new_zeros(G, v.shape[-1])
                heads.append(o)
            rows[b][qs + i] = torch.cat(heads, 0)
    o = torch.stack([torch.stack(r, 0) for r in rows], 0).to(q.dtype)
    if return_block_indices:
        return o, chosen_all.to(q.device)
    return o
