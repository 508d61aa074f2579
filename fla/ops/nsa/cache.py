"""``nsa_cache_append_one``: write one new token per row into NSA's start-aligned KV cache and, when it completes a
block, its mean-pooled block into the compressed cache; in place, without reading any device value on the host.

This is the cache update of an NSA decoding step. Row n holds ``lengths[n]`` tokens at positions
0 .. lengths[n] - 1 of the raw caches; the new token goes to position ``lengths[n]``. When that position is the last
of a block ((lengths[n] + 1) % block_size == 0), block b = (lengths[n] + 1) // block_size - 1 is pooled: the
float32 mean of its ``block_size`` stored tokens (the new one included, as stored, i.e. in the cache dtype), cast to
the compressed cache's dtype: the pooling of ``fla.ops.nsa.compression.mean_pool_blocks``, so incremental decoding
keeps the same compressed keys as the parallel path.

Rows with ``real[n] == 0`` (a padding token) are not written. Whether a row is written is decided on the device,
by masks: the step issues no host synchronisation, its launch shapes depend on tensor shapes only (CUDA-graph
capturable). ``lengths`` is not advanced here (the caller adds ``real``).

Two implementations of one definition:

- torch path (CPU; CUDA with ``FLA_BACKEND=torch``): gathers, ``torch.where`` and index writes with long indices
  (never boolean indexing, which sizes its output from device values);
- Triton path (``fla.ops.nsa.cache_kernels``, CUDA by default): one program per (row, kv head).
"""

from __future__ import annotations

from typing import Optional

import torch

from fla.utils import FLOAT_DTYPES, check_positive_int, check_tensor, use_triton

INDEX_DTYPES = (torch.int32, torch.int64)
REAL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def nsa_cache_append_one_torch(k_cache, v_cache, k_cmp, v_cmp, k_new, v_new, lengths, real, block_size: int) -> None:
    """Torch path of ``nsa_cache_append_one`` (arguments checked by it)."""
    N, C = k_cache.shape[:2]
    NB = k_cmp.shape[1]
    if N == 0 or C == 0:
        return
    rows = torch.arange(N, device=k_cache.device)
    pos = lengths.long()
    write = (pos >= 0) & (pos < C)  # a row at capacity is left alone (the caller reserves capacity)
    if real is not None:
        write = write & (real != 0)
    slot = pos.clamp(0, C - 1)  # rows not written store back what they hold
    done = write & ((pos + 1) % block_size == 0)
    block = ((pos + 1) // block_size - 1).clamp(0, max(NB - 1, 0))
    tokens = (block[:, None] * block_size + torch.arange(block_size, device=k_cache.device)).clamp(max=C - 1)
    for cache, cmp, new in ((k_cache, k_cmp, k_new), (v_cache, v_cmp, v_new)):
        cache[rows, slot] = torch.where(write[:, None, None], new.detach().to(cache.dtype), cache[rows, slot])
        if NB == 0:  # C < block_size: no block can complete
            continue
        pooled = cache[rows[:, None], tokens].float().mean(1).to(cmp.dtype)  # [N, H, D], read after the write
        cmp[rows, block] = torch.where(done[:, None, None], pooled, cmp[rows, block])


def nsa_cache_append_one(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    lengths: torch.Tensor,
    real: Optional[torch.Tensor],
    block_size: int,
) -> None:
    """Append one token per row to NSA's caches, in place (see the module docstring). Not differentiable.

    Args:
        k_cache, v_cache: [N, C, H, D] / [N, C, H, V] start-aligned raw caches, contiguous, any float dtype.
        k_cmp, v_cmp: [N, NB, H, D] / [N, NB, H, V] compressed caches, contiguous, NB >= C // block_size.
        k_new, v_new: [N, H, D] / [N, H, V] the new token's key and value (cast to the caches' dtypes).
        lengths: [N] int32 / int64, the tokens each row holds before this step (the new token's position).
            ``lengths[n] < C`` for every written row is the caller's to ensure (checking it would read the
            device); a row at or beyond capacity is not written.
        real: [N] bool or integer (0 = padding: the row is not written), or None (every row is written).
        block_size: tokens per compressed block.

    Returns:
        None; the four caches are updated in place.

    CUDA tensors take the Triton kernel, CPU tensors the torch path (``FLA_BACKEND`` overrides).
    """
    check_tensor("k_cache", k_cache, ndim=4, dtype=FLOAT_DTYPES)
    N, C, H, D = k_cache.shape
    device = k_cache.device
    check_tensor("v_cache", v_cache, ndim=4, dtype=FLOAT_DTYPES, shape=(N, C, H, None), device=device)
    V = v_cache.shape[-1]
    check_tensor("k_cmp", k_cmp, ndim=4, dtype=FLOAT_DTYPES, shape=(N, None, H, D), device=device)
    NB = k_cmp.shape[1]
    check_tensor("v_cmp", v_cmp, ndim=4, dtype=FLOAT_DTYPES, shape=(N, NB, H, V), device=device)
    check_tensor("k_new", k_new, ndim=3, dtype=FLOAT_DTYPES, shape=(N, H, D), device=device)
    check_tensor("v_new", v_new, ndim=3, dtype=FLOAT_DTYPES, shape=(N, H, V), device=device)
    check_tensor("lengths", lengths, ndim=1, dtype=INDEX_DTYPES, shape=(N,), device=device)
    if real is not None:
        check_tensor("real", real, ndim=1, dtype=REAL_DTYPES, shape=(N,), device=device)
    check_positive_int("block_size", block_size)
    if NB < C // block_size:
        raise ValueError(f"k_cmp / v_cmp hold NB={NB} blocks, fewer than the C // block_size = {C} // {block_size} "
                         f"= {C // block_size} complete blocks the raw caches can hold")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is written in place); got strides {t.stride()} for "
                             f"shape {list(t.shape)}")
    if use_triton(k_cache):
        from fla.ops.nsa.cache_kernels import cache_append_one_fwd

        cache_append_one_fwd(k_cache, v_cache, k_cmp, v_cmp, k_new.detach(), v_new.detach(), lengths, real,
                             block_size)
        return
    nsa_cache_append_one_torch(k_cache, v_cache, k_cmp, v_cmp, k_new, v_new, lengths, real, block_size)
