"""NSA's block compression (mean pooling over blocks of ``block_size`` tokens) and block selection, in torch.

Used by the torch path of ``parallel_nsa`` and by decoding. Only complete blocks are ever pooled: a query at
position P sees the (P + 1) // BS complete blocks before or ending at it.
"""

from __future__ import annotations

from typing import Tuple

import torch


def mean_pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [B, T, H, D] -> [B, T // block_size, H, D]: the mean of every complete block (a partial last block is
    dropped)."""
    B, T = x.shape[:2]
    n = T // block_size
    return x[:, :n * block_size].unflatten(1, (n, block_size)).mean(2)


def compression_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, num_blocks: torch.Tensor,
                          scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over compressed blocks, float32.

    Args:
        q: [B, T, H, G, D] (G query heads per kv head); k_cmp: [B, C, H, D]; v_cmp: [B, C, H, V].
        num_blocks: [B, T] or [T] number of visible blocks per query (blocks c < num_blocks are attended to).

    Returns:
        (o [B, T, H, G, V], probabilities [B, H, G, T, C]; rows without a visible block are all zero).
    """
    s = torch.einsum("bthgd,bchd->bhgtc", q, k_cmp) * scale
    C = k_cmp.shape[1]
    visible = torch.arange(C, device=q.device) < num_blocks[..., None]  # [(B,) T, C]
    if visible.ndim == 2:
        visible = visible[None]
    visible = visible[:, None, None]  # [B, 1, 1, T, C]
    s = s.masked_fill(~visible, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1) * visible  # a query with no visible block gets all-zero probabilities
    o = torch.einsum("bhgtc,bchv->bthgv", p, v_cmp)
    return o, p


def select_blocks(probs: torch.Tensor, current_block: torch.Tensor, num_candidates: int,
                  block_counts: int) -> torch.Tensor:
    """Top-``block_counts`` blocks per query and kv head.

    Args:
        probs: [B, H, G, T, C] compression probabilities (non-differentiable use).
        current_block: [T] or [B, T] int, IC = P // block_size of every query.
        num_candidates: number of block columns to rank (>= max IC + 1).

    Returns:
        block indices [B, T, H, block_counts] int64, ascending, -1 padded. Blocks c < IC are ranked by the
        group-summed probability; blocks 0, IC - 1 and IC are forced (IC > IC - 1 > 0 > any other block).
    """
    B, H, G, T, C = probs.shape
    imp = probs.detach().sum(2)  # [B, H, T, C]
    W = max(num_candidates, 1)
    if W > C:
        imp = torch.nn.functional.pad(imp, (0, W - C))
    else:
        imp = imp[..., :W]
    ic = current_block if current_block.ndim == 2 else current_block[None].expand(B, T)
    ic = ic[:, None, :, None]  # [B, 1, T, 1]
    c = torch.arange(W, device=probs.device)
    imp = imp.masked_fill(c >= ic, float("-inf"))
    imp = torch.where(c == 0, torch.full_like(imp, float(G)), imp)
    imp = torch.where(c == ic - 1, torch.full_like(imp, G + 1.0), imp)
    imp = torch.where(c == ic, torch.full_like(imp, G + 2.0), imp)
    imp = imp.masked_fill(c > ic, float("-inf"))
    top = min(block_counts, W)
    values, idx = imp.topk(top, dim=-1)
    idx = idx.masked_fill(values == float("-inf"), W)
    idx = idx.sort(-1).values
    idx = idx.masked_fill(idx == W, -1)
    if top < block_counts:
        idx = torch.nn.functional.pad(idx, (0, block_counts - top), value=-1)
    return idx.permute(0, 2, 1, 3).contiguous()  # [B, T, H, S]


def blocks_to_token_mask(block_indices: torch.Tensor, num_keys: int, block_size: int,
                         positions: torch.Tensor) -> torch.Tensor:
    """[B, T, H, S] block ids (-1 = none) -> [B, H, T, num_keys] bool: key j allowed iff its block is selected and
    j <= the query's position (positions: [T] or [B, T])."""
    B, T, H, S = block_indices.shape
    nb = (num_keys + block_size - 1) // block_size
    idx = block_indices.long().permute(0, 2, 1, 3)  # [B, H, T, S]
    idx = torch.where((idx >= 0) & (idx < nb), idx, nb)
    chosen = torch.zeros(B, H, T, nb + 1, dtype=torch.bool, device=block_indices.device)
    chosen.scatter_(-1, idx, True)
    key_block = torch.arange(num_keys, device=block_indices.device) // block_size
    mask = chosen[..., key_block]  # [B, H, T, Tk]
    pos = positions if positions.ndim == 2 else positions[None]
    causal = torch.arange(num_keys, device=block_indices.device) <= pos[..., None]  # [B or 1, T, Tk]
    return mask & causal[:, None]


def append_compressed_blocks(k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, old_lengths: torch.Tensor, new_lengths: torch.Tensor,
                             block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pool the blocks that became complete between ``old_lengths`` and ``new_lengths`` and write them into the
    compressed cache (no other block is read or recomputed).

    Args:
        k_cmp, v_cmp: [N, NB, H, D] / [N, NB, H, V] compressed caches, block c of row n valid for
            c < old_lengths[n] // block_size; NB * block_size == the raw caches' capacity.
        k_cache, v_cache: [N, C, H, D] / [N, C, H, V] start-aligned raw caches holding new_lengths[n] tokens.

    Returns:
        the updated (k_cmp, v_cmp) (new tensors when a block completed, the same ones otherwise).
    """
    old_nb, new_nb = old_lengths // block_size, new_lengths // block_size
    count = new_nb - old_nb
    most = int(count.max()) if count.numel() else 0
    if most <= 0:
        return k_cmp, v_cmp
    N = k_cache.shape[0]
    j = torch.arange(most, device=k_cache.device)
    blk = old_nb[:, None] + j[None]  # [N, most]
    valid = j[None] < count[:, None]
    rows = torch.arange(N, device=k_cache.device)[:, None].expand(N, most)[valid]
    blk = blk[valid]
    tok = blk[:, None] * block_size + torch.arange(block_size, device=k_cache.device)  # [M, BS]
    k_new = k_cache[rows[:, None], tok].mean(1)
    v_new = v_cache[rows[:, None], tok].mean(1)
    k_cmp = k_cmp.index_put((rows, blk), k_new.to(k_cmp.dtype))
    v_cmp = v_cmp.index_put((rows, blk), v_new.to(v_cmp.dtype))
    return k_cmp, v_cmp
