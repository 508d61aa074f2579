"""The LTE decode cache: a ring of the last ``window_size + 1`` tokens plus a buffer of retained evicted tokens.

Layout (per layer; S = W1 + b slots, W1 = window_size + 1 ring slots first, then b = buffer_size buffer slots):

    k_cache [B, S, H, D]  keys with RoPE applied        v_cache [B, S, H, V]  values (k_cache's dtype)
    score   [B, S, H] float32  router score of the token in the slot (-inf: empty or not yet scored)
    sink    [B, S, H] bool     the slot's token is a sink (never evicted; always False on an invalid slot)
    valid   [B, S, H] bool     the slot holds a real token

The token at cache position c (every token counts, left pads included, same for all rows) lives in ring slot
c % W1. Buffer slots are unordered. Priority of a slot: +inf for a sink, else its score; -inf when empty.

Ops:

- ``lte_cache_step``: one decode step, in place. The token leaving ring slot ``slot`` moves to the buffer's
  lowest-priority slot iff it is valid, selected (sink or score > 0) and strictly above that slot's priority (a tie
  keeps the incumbent); then the new token takes the ring slot with score -inf (the layer scores it later by writing
  ``score[:, slot, h]``). The buffer is therefore the streaming top-b by priority of every selected token that left
  the window. Torch path (vectorised gathers / ``index_put_``) or Triton kernel (``fla.ops.lte.cache_kernels``,
  the default on CUDA; proven on an H200); both run without host syncs or data-dependent shapes (CUDA-graph capturable).
- ``lte_cache_prefill``: the state after L prompt tokens in one shot (sort-based top-b), equal to L steps from
  ``lte_empty_cache`` with each token's final score written into the ring before it leaves.
- ``lte_empty_cache``: the state before any token.

Cost model of one step, per (row, kv head): read the b buffer priorities (b x (4 + 1 + 1) bytes) and the outgoing
slot; write at most one (D + V)-element row plus 6 bytes to the buffer and one row to the ring: about
6b + 2 (D + V) * elem bytes, independent of the sequence length. The argmin over b is the only O(b) work (b = 512
in the paper: 3 KiB a head, negligible next to the attention read of S (D + V) elements).
"""

from __future__ import annotations

from typing import Tuple

import torch

from fla.utils import FLOAT_DTYPES, check_positive_int, check_tensor, use_triton

CacheState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def lte_empty_cache(B: int, window_size: int, buffer_size: int, H: int, D: int, V: int,
                    dtype: torch.dtype = torch.float32, device=None) -> CacheState:
    """An empty LTE cache: (k_cache [B,S,H,D], v_cache [B,S,H,V] zeros in ``dtype``, score [B,S,H] float32 -inf,
    sink [B,S,H] bool False, valid [B,S,H] bool False), S = window_size + 1 + buffer_size."""
    for name, value in (("B", B), ("H", H), ("D", D), ("V", V), ("window_size", window_size),
                        ("buffer_size", buffer_size)):
        check_positive_int(name, value, minimum=0)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    S = window_size + 1 + buffer_size
    k_cache = torch.zeros(B, S, H, D, dtype=dtype, device=device)
    v_cache = torch.zeros(B, S, H, V, dtype=dtype, device=device)
    score = torch.full((B, S, H), float("-inf"), dtype=torch.float32, device=device)
    sink = torch.zeros(B, S, H, dtype=torch.bool, device=device)
    valid = torch.zeros(B, S, H, dtype=torch.bool, device=device)
    return k_cache, v_cache, score, sink, valid


# ----------------------------------------------------------------------------------------------------------- step

def _priority(score: torch.Tensor, sink: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    inf = torch.full((), float("inf"), dtype=torch.float32, device=score.device)
    return torch.where(valid, torch.where(sink, inf, score.float()), -inf)


def lte_cache_step_torch(k_cache, v_cache, score, sink, valid, slot, new_k, new_v, new_valid, new_sink,
                         window_size: int) -> None:
    """Torch path of ``lte_cache_step`` (in place; gathers and ``index_put_`` only, no host sync)."""
    B, S, H, _ = k_cache.shape
    W1 = window_size + 1
    rows = torch.arange(B, device=k_cache.device)
    slot = slot.long()
    if S > W1:
        # the outgoing token, read before anything is written
        out_k, out_v = k_cache[rows, slot], v_cache[rows, slot]  # [B, H, D], [B, H, V]
        out_score, out_sink, out_valid = score[rows, slot], sink[rows, slot], valid[rows, slot]  # [B, H]
        buf_priority = _priority(score[:, W1:], sink[:, W1:], valid[:, W1:])  # [B, b, H]
        low, target = buf_priority.min(dim=1)  # first lowest slot: empty slots (-inf) come first
        out_priority = torch.where(out_sink, torch.full_like(out_score, float("inf")), out_score)
        move = out_valid & (out_sink | (out_score > 0)) & (out_priority > low)  # strict: ties keep the incumbent
        r, h = rows[:, None].expand(B, H), torch.arange(H, device=k_cache.device)[None, :].expand(B, H)
        t = target + W1
        k_cache[r, t, h] = torch.where(move[..., None], out_k, k_cache[r, t, h])
        v_cache[r, t, h] = torch.where(move[..., None], out_v, v_cache[r, t, h])
        score[r, t, h] = torch.where(move, out_score, score[r, t, h])
        sink[r, t, h] = torch.where(move, out_sink, sink[r, t, h])
        valid[r, t, h] = valid[r, t, h] | move
    k_cache[rows, slot] = new_k
    v_cache[rows, slot] = new_v
    # a device tensor, not a Python float: a scalar would be copied from the host, which CUDA-graph capture refuses
    score[rows, slot] = torch.full((B, H), float("-inf"), dtype=score.dtype, device=score.device)
    sink[rows, slot] = (new_sink & new_valid)[:, None].expand(B, H)
    valid[rows, slot] = new_valid[:, None].expand(B, H)


def _check_cache(k_cache, v_cache, score, sink, valid, window_size):
    check_tensor("k_cache", k_cache, ndim=4, dtype=FLOAT_DTYPES)
    B, S, H, D = k_cache.shape
    dev = k_cache.device
    check_tensor("v_cache", v_cache, ndim=4, dtype=k_cache.dtype, device=dev)
    if tuple(v_cache.shape[:3]) != (B, S, H):
        raise ValueError(f"v_cache must have shape [B={B}, S={S}, H={H}, V] (as k_cache but its last dim), "
                         f"got {list(v_cache.shape)}")
    check_tensor("score", score, dtype=torch.float32, shape=(B, S, H), device=dev)
    check_tensor("sink", sink, dtype=torch.bool, shape=(B, S, H), device=dev)
    check_tensor("valid", valid, dtype=torch.bool, shape=(B, S, H), device=dev)
    check_positive_int("window_size", window_size, minimum=0)
    if S < window_size + 1:
        raise ValueError(f"the cache has S={S} slots (k_cache.shape[1]) but window_size={window_size} needs at least "
                         f"window_size + 1 = {window_size + 1} ring slots (S = window_size + 1 + buffer_size)")
    return B, S, H, D, v_cache.shape[-1]


def lte_cache_step(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    score: torch.Tensor,
    sink: torch.Tensor,
    valid: torch.Tensor,
    slot: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    new_valid: torch.Tensor,
    new_sink: torch.Tensor,
    window_size: int,
) -> None:
    """Insert one new token per row into an LTE cache, IN PLACE (returns None).

    Args:
        k_cache [B, S, H, D], v_cache [B, S, H, V] (one float dtype), score [B, S, H] float32, sink / valid
            [B, S, H] bool: the cache (layout in the module docstring), S = window_size + 1 + buffer_size.
        slot: [B] int64/int32 ring slot being overwritten, ``c % (window_size + 1)`` for the new token at cache
            position c (a tensor so the step is CUDA-graph capturable; values are not checked, to avoid a sync).
        new_k [B, H, D], new_v [B, H, V] (the cache dtype): the new token (keys with RoPE applied).
        new_valid [B] bool (False for a pad), new_sink [B] bool (stored as ``new_sink & new_valid``).
        window_size: w >= 0; the first w + 1 slots are the ring, the rest the buffer.

    Per (row, kv head): the outgoing token of ring slot ``slot`` moves into the buffer slot of lowest priority
    (empty slots first; the lowest index among equals) iff it is valid, selected (sink or score > 0) and its priority
    is strictly higher. Then the ring slot takes the new token with score -inf: write ``score[:, slot, h]`` once the
    router has scored it.
    """
    B, S, H, D, V = _check_cache(k_cache, v_cache, score, sink, valid, window_size)
    dev = k_cache.device
    check_tensor("slot", slot, dtype=(torch.int64, torch.int32), shape=(B,), device=dev)
    check_tensor("new_k", new_k, dtype=k_cache.dtype, shape=(B, H, D), device=dev)
    check_tensor("new_v", new_v, dtype=k_cache.dtype, shape=(B, H, V), device=dev)
    check_tensor("new_valid", new_valid, dtype=torch.bool, shape=(B,), device=dev)
    check_tensor("new_sink", new_sink, dtype=torch.bool, shape=(B,), device=dev)
    if B == 0 or H == 0:
        return None
    if use_triton(k_cache):
        from fla.ops.lte.cache_kernels import lte_cache_step_fwd, lte_cache_step_supported

        if lte_cache_step_supported(k_cache, v_cache, score, sink, valid):
            lte_cache_step_fwd(k_cache, v_cache, score, sink, valid, slot, new_k, new_v, new_valid, new_sink,
                               window_size)
            return None
    lte_cache_step_torch(k_cache, v_cache, score, sink, valid, slot, new_k, new_v, new_valid, new_sink, window_size)
    return None


# -------------------------------------------------------------------------------------------------------- prefill

def lte_cache_prefill_torch(k, v, score, sink, valid, window_size: int, buffer_size: int) -> CacheState:
    """Torch path of ``lte_cache_prefill``."""
    B, L, H, D = k.shape
    V = v.shape[-1]
    W1 = window_size + 1
    k_c, v_c, s_c, sink_c, valid_c = lte_empty_cache(B, window_size, buffer_size, H, D, V, k.dtype, k.device)
    sink = sink & valid
    start = max(0, L - W1)  # positions < start have left the window
    if L > start:
        slots = torch.arange(start, L, device=k.device) % W1
        ring_valid = valid[:, start:, None].expand(B, L - start, H)
        k_c[:, slots] = k[:, start:]
        v_c[:, slots] = v[:, start:]
        s_c[:, slots] = score[:, start:].float().masked_fill(~ring_valid, float("-inf"))
        sink_c[:, slots] = sink[:, start:, None].expand(B, L - start, H)
        valid_c[:, slots] = ring_valid
    kept_count = min(buffer_size, start)
    if kept_count == 0:
        return k_c, v_c, s_c, sink_c, valid_c
    old_score = score[:, :start].float()
    old_sink = sink[:, :start, None].expand(B, start, H)
    candidate = valid[:, :start, None] & (old_sink | (old_score > 0))
    priority = torch.where(old_sink, torch.full_like(old_score, float("inf")), old_score)
    priority = priority.masked_fill(~candidate, float("-inf"))
    # stable sort: among equal priorities the earliest position wins (what streaming does for sinks, see docstring)
    idx = torch.sort(priority, dim=1, descending=True, stable=True).indices[:, :kept_count]  # [B, n, H]
    kept = torch.gather(candidate, 1, idx)
    # buffer order: kept tokens by position, then the empty slots
    idx = torch.gather(idx, 1, torch.where(kept, idx, start).sort(dim=1).indices)
    kept = torch.gather(candidate, 1, idx)
    buf = slice(W1, W1 + kept_count)
    k_c[:, buf] = torch.where(kept[..., None], torch.gather(k[:, :start], 1, idx[..., None].expand(-1, -1, -1, D)),
                              k_c[:, buf])
    v_c[:, buf] = torch.where(kept[..., None], torch.gather(v[:, :start], 1, idx[..., None].expand(-1, -1, -1, V)),
                              v_c[:, buf])
    s_c[:, buf] = torch.where(kept, torch.gather(old_score, 1, idx), s_c[:, buf])
    sink_c[:, buf] = kept & torch.gather(old_sink, 1, idx)
    valid_c[:, buf] = kept
    return k_c, v_c, s_c, sink_c, valid_c


def lte_cache_prefill(
    k: torch.Tensor,
    v: torch.Tensor,
    score: torch.Tensor,
    sink: torch.Tensor,
    valid: torch.Tensor,
    window_size: int,
    buffer_size: int,
) -> CacheState:
    """The LTE cache after a prompt of L tokens (cache positions 0 .. L - 1), built in one shot.

    Args:
        k [B, L, H, D] (RoPE applied), v [B, L, H, V]: one float dtype (the cache dtype).
        score [B, L, H] float: final router scores. sink [B, L] bool: sink tokens. valid [B, L] bool: False on
            (left) pads. A pad is never kept, never a sink, and its ring slot has valid False and score -inf.
        window_size: w >= 0 (W1 = w + 1 ring slots). buffer_size: b >= 0.

    Returns:
        (k_cache, v_cache, score, sink, valid) as ``lte_empty_cache``. The ring holds positions
        max(0, L - W1) .. L - 1 at slot ``pos % W1``; the buffer the top-b by priority (+inf for sinks, else score)
        of the valid tokens at positions < L - W1 that are sinks or have score > 0, **sorted by position**, empty
        slots last. The next token (position L) goes to ring slot ``L % W1`` (``lte_cache_step``'s ``slot``).

    Equals ``lte_cache_step`` run token by token from ``lte_empty_cache`` (with each token's final score written
    into the ring before it leaves) whenever no two candidate non-sink scores tie at the cut-off. On such a tie both
    keep the same multiset of priorities but may keep different tokens: prefill keeps the earliest ones, streaming
    whichever its slot order gives. Sinks (tied at +inf) agree: both keep the earliest b sinks.
    """
    check_tensor("k", k, ndim=4, dtype=FLOAT_DTYPES)
    B, L, H, D = k.shape
    dev = k.device
    check_tensor("v", v, ndim=4, dtype=k.dtype, device=dev)
    if tuple(v.shape[:3]) != (B, L, H):
        raise ValueError(f"v must have shape [B={B}, L={L}, H={H}, V] (as k but its last dim), got {list(v.shape)}")
    check_tensor("score", score, dtype=FLOAT_DTYPES, shape=(B, L, H), device=dev)
    check_tensor("sink", sink, dtype=torch.bool, shape=(B, L), device=dev)
    check_tensor("valid", valid, dtype=torch.bool, shape=(B, L), device=dev)
    check_positive_int("window_size", window_size, minimum=0)
    check_positive_int("buffer_size", buffer_size, minimum=0)
    return lte_cache_prefill_torch(k, v, score, sink, valid, window_size, buffer_size)
