"""Cumulative sums of per-token scalars [B, T, H] restarted at every chunk of ``chunk_size`` tokens.

The chunked linear-attention ops need the log-decay ``g`` summed inside each chunk (forward), and the gradient of
those sums turned back into the gradient of ``g``: a reverse (suffix) cumulative sum inside each chunk (backward).
Chunks are cut per sequence: with ``cu_seqlens`` (packed sequences, B = 1) a chunk never straddles two sequences
and the last chunk of a sequence may be short.

    forward:  out[t] = sum_{s in chunk(t), s <= t} x[s]
    reverse:  out[t] = sum_{s in chunk(t), s >= t} x[s]

Arithmetic is in float32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fla.ops.utils.index import prepare_chunk_indices


@triton.jit
def _chunk_local_cumsum_kernel(X, Y, chunk_indices, cu_seqlens, T, H: tl.constexpr, BT: tl.constexpr,
                               REVERSE: tl.constexpr, IS_VARLEN: tl.constexpr):
    # one program per (chunk, head); the chunk numbering is the one of fla.ops.gated_delta_rule.chunk_common
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        NT = tl.cdiv(T, BT)
        bos = (i_c // NT).to(tl.int64) * T
        i_t = (i_c % NT).to(tl.int64)
        eos = bos + T
    rows = bos + i_t * BT + tl.arange(0, BT)
    mask = rows < eos
    x = tl.load(X + rows * H + i_h, mask=mask, other=0.0).to(tl.float32)
    y = tl.cumsum(x, axis=0, reverse=REVERSE)
    tl.store(Y + rows * H + i_h, y.to(Y.dtype.element_ty), mask=mask)


def chunk_local_cumsum(
    x: torch.Tensor,
    chunk_size: int = 64,
    reverse: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_indices: Optional[torch.Tensor] = None,
    output_dtype: Optional[torch.dtype] = torch.float32,
) -> torch.Tensor:
    """Chunk-local (reverse) cumulative sum over time of ``x`` [B, T, H] (Triton; CUDA or the interpreter).

    Args:
        x: [B, T, H], any float dtype.
        chunk_size: power of 2 (>= 16 for efficiency; any power of 2 works).
        reverse: suffix sums instead of prefix sums.
        cu_seqlens: [N + 1] offsets of packed sequences (B = 1), or None.
        chunk_indices: ``prepare_chunk_indices(cu_seqlens, chunk_size)`` if already computed (saves a sync).
        output_dtype: dtype of the result (default float32; None keeps x.dtype).

    Returns:
        [B, T, H] in ``output_dtype``.
    """
    if x.ndim != 3:
        raise ValueError(f"x must have shape [B, T, H], got {list(x.shape)}")
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of 2, got {chunk_size}")
    B, T, H = x.shape
    x = x.contiguous()
    y = torch.empty_like(x, dtype=output_dtype or x.dtype)
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
    num_chunks = B * triton.cdiv(T, chunk_size) if cu_seqlens is None else chunk_indices.shape[0]
    if num_chunks == 0 or H == 0:
        return y
    _chunk_local_cumsum_kernel[(num_chunks, H)](
        x, y, chunk_indices, cu_seqlens, T, H=H, BT=chunk_size, REVERSE=reverse, IS_VARLEN=cu_seqlens is not None,
        num_warps=1,
    )
    return y


def chunk_local_cumsum_torch(x: torch.Tensor, chunk_size: int = 64, reverse: bool = False,
                             cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch reference of ``chunk_local_cumsum`` (float32 result; a Python loop over sequences and chunks)."""
    B, T, H = x.shape
    xf = x.float()
    out = torch.zeros_like(xf)
    bounds = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, s, e) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    for b, s, e in bounds:
        for c in range(s, e, chunk_size):
            seg = xf[b, c:min(c + chunk_size, e)]
            out[b, c:c + seg.shape[0]] = seg.flip(0).cumsum(0).flip(0) if reverse else seg.cumsum(0)
    return out
