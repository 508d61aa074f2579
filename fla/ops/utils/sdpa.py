"""Masked ``scaled_dot_product_attention`` in blocks of query rows: what the torch (CPU) paths of the attention ops
share.

A boolean [T, T] mask makes SDPA compute every (query, key) pair, and on the CPU it turns the whole mask into a float
bias (parallel_lte_attn's per-head dense mask at T = 8192 with 16 heads: 5 to 9 GiB peak as measured, T = 16384 would
need about 20). ``blocked_sdpa`` cuts the queries into blocks, each over only the keys it can attend to (a window's
keys, plus keys gathered by index, e.g. LTE's selected ones), which bounds the memory to one block and skips the masked
work. Its backward recomputes one block at a time and accumulates the key / value gradients in place: plain autograd
through per-block slices and gathers would materialise a full-length gradient per block (O(T^2 / rows) work: SWA forward
+ backward at T = 32768 took 74 s that way, 4 s with this backward, on a 2-core CPU).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fla.utils import autocast_custom_bwd, autocast_custom_fwd

MAX_BLOCK_ELEMENTS = 2 ** 25  # (batch x query heads x rows x keys) of one block's mask: ~160 MB of bias + mask


def query_block_rows(batch_heads: int, keys: int, max_elements: int = MAX_BLOCK_ELEMENTS) -> int:
    """Query rows per block: the largest power of two (at least 64) whose ``batch_heads x rows x keys`` mask holds
    at most ``max_elements`` entries."""
    rows = max(max_elements // max(batch_heads * keys, 1), 1)
    return max(1 << (rows.bit_length() - 1), 64)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA on the [B, L, HQ, D] layout with a boolean mask given per key/value head.

    Args:
        q: [B, L, HQ, D]; k: [B, S, H, D]; v: [B, S, H, V]; HQ a multiple of H (query head hq uses kv head
            hq // (HQ // H)).
        mask: bool, True = attend, broadcastable to [B, H, L, S] (e.g. [L, S] or [B, H, L, S]). A query row that
            sees no key gets 0 (and passes no gradient).
        scale: the logit scale.

    Returns:
        o [B, L, HQ, V] in q.dtype (a transposed view: call ``.contiguous()`` where it matters).
    """
    HQ, H = q.shape[2], k.shape[2]
    if mask.dim() == 4 and mask.shape[1] == H and HQ != H:
        mask = mask.repeat_interleave(HQ // H, dim=1)
    empty = ~mask.any(-1, keepdim=True)  # [..., L, 1]
    has_empty = bool(empty.any())
    if has_empty:  # SDPA would give NaN there: let such rows see every key, then zero them
        mask = mask | empty
    gqa = {"enable_gqa": True} if HQ != H else {}
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale, **gqa)
    if has_empty:
        o = o.masked_fill(empty, 0.0)  # empty broadcasts to o's [B, HQ, L, V]
    return o.transpose(1, 2)


# block_keys(a, b) -> (lo, hi, idx, mask): the keys of query rows [a, b) are k[idx] (idx [B, m, H] long, per
# key/value head, or None) followed by k[:, lo:hi]; mask bool broadcastable to [B, H, b - a, m + hi - lo]
BlockKeys = Callable[[int, int], Tuple[int, int, Optional[torch.Tensor], torch.Tensor]]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D], idx [B, m, H] -> [B, m, H, D]."""
    return x.gather(1, idx[..., None].expand(-1, -1, -1, x.shape[-1]))


def _block_kv(k, v, lo: int, hi: int, idx: Optional[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    ks, vs = [k[:, lo:hi]], [v[:, lo:hi]]
    if idx is not None:
        ks.insert(0, _gather(k, idx))
        vs.insert(0, _gather(v, idx))
    return ks, vs


class BlockedSDPAFunction(torch.autograd.Function):
    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, q, k, v, scale: float, rows: int, block_keys: BlockKeys):
        B, T, HQ, _ = q.shape
        o = q.new_empty(B, T, HQ, v.shape[-1])
        for a in range(0, T, rows):
            b = min(a + rows, T)
            lo, hi, idx, mask = block_keys(a, b)
            ks, vs = _block_kv(k, v, lo, hi, idx)
            o[:, a:b] = masked_sdpa(q[:, a:b], torch.cat(ks, 1), torch.cat(vs, 1), mask, scale)
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.rows, ctx.block_keys = scale, rows, block_keys
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_custom_bwd
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        T = q.shape[1]
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)  # summed over many blocks: float32
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for a in range(0, T, ctx.rows):
            b = min(a + ctx.rows, T)
            lo, hi, idx, mask = ctx.block_keys(a, b)
            qb = q[:, a:b].detach().requires_grad_(True)
            ks, vs = _block_kv(k.detach(), v.detach(), lo, hi, idx)
            ks = [t.requires_grad_(True) for t in ks]
            vs = [t.requires_grad_(True) for t in vs]
            with torch.enable_grad():
                ob = masked_sdpa(qb, torch.cat(ks, 1), torch.cat(vs, 1), mask, ctx.scale)
            grads = torch.autograd.grad(ob, [qb, *ks, *vs], do[:, a:b])
            dq[:, a:b] = grads[0]
            dk_blk, dv_blk = grads[1:1 + len(ks)], grads[1 + len(ks):]
            dk[:, lo:hi] += dk_blk[-1]
            dv[:, lo:hi] += dv_blk[-1]
            if idx is not None:
                dk.scatter_add_(1, idx[..., None].expand(-1, -1, -1, k.shape[-1]), dk_blk[0].float())
                dv.scatter_add_(1, idx[..., None].expand(-1, -1, -1, v.shape[-1]), dv_blk[0].float())
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def blocked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rows: int,
                 block_keys: BlockKeys) -> torch.Tensor:
    """Attention in blocks of ``rows`` query rows, each over the keys ``block_keys`` names; differentiable in q, k, v.

    Args:
        q: [B, T, HQ, D]; k: [B, S, H, D]; v: [B, S, H, V] (S keys, e.g. S = T); HQ a multiple of H.
        scale: the logit scale. rows: query rows per block (``query_block_rows``).
        block_keys: ``(a, b) -> (lo, hi, idx, mask)`` for query rows [a, b): their keys are the gathered k[idx]
            (idx [B, m, H] long, positions per key/value head; or None) followed by k[:, lo:hi]; mask bool,
            broadcastable to [B, H, b - a, m + hi - lo], True = attend (a row that sees no key gets 0). Called
            again, for the same blocks, in the backward.

    Returns:
        o [B, T, HQ, V] in q.dtype. With one block (rows >= T) it is a plain call, differentiated by autograd.
    """
    T = q.shape[1]
    if rows >= T:
        lo, hi, idx, mask = block_keys(0, T)
        ks, vs = _block_kv(k, v, lo, hi, idx)
        return masked_sdpa(q, torch.cat(ks, 1), torch.cat(vs, 1), mask, scale)
    return BlockedSDPAFunction.apply(q, k, v, scale, rows, block_keys)
