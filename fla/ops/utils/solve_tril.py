"""Inverse of ``I + A`` for strictly lower-triangular 64 x 64 blocks ``A`` (one block per chunk and head).

The chunked delta rule needs ``T = (I + A)^{-1}`` of the within-chunk interaction matrix (the WY / UT
representation). ``I + A`` is unit lower-triangular, so is its inverse. The 64 x 64 block is split into 4 x 4
sub-blocks of 16 x 16:

* each diagonal block ``(I + A_ii)^{-1}`` by forward substitution in registers (row i of the inverse only needs the
  rows above it);
* the sub-diagonal blocks from the block form of ``(I + A) X = I``:
  ``X_ij = -X_ii sum_{j <= m < i} A_im X_mj`` for i > j, computed diagonal by diagonal.

All arithmetic is in float32 with exact (``ieee``) products: the inverse amplifies rounding errors of A.

``unit_lower_inverse_64`` is a ``@triton.jit`` helper taking the ten lower blocks of A as register tiles (the fused
``beta K K^T -> inverse`` kernel of the gated delta rule calls it); ``solve_tril`` is the standalone op reading A
from memory.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fla.ops.utils.index import prepare_chunk_indices


@triton.jit
def unit_lower_inverse_16(a):
    """(I + a)^{-1} for a strictly lower-triangular [16, 16] float32 tile ``a`` (entries on and above the diagonal
    must be 0)."""
    o = tl.arange(0, 16)
    # X = I + Y with Y strictly lower; row i of Y is  n_i + sum_{j<i} n_ij Y_j  where n = -a (the rows j < i of Y
    # are final by then, and n_ij = 0 for j >= i so the unfinished rows never contribute)
    n = -a
    y = n
    for i in tl.static_range(2, 16):
        n_i = tl.sum(tl.where(o[:, None] == i, n, 0.0), axis=0)
        y_i = n_i + tl.sum(n_i[:, None] * y, axis=0)
        y = tl.where(o[:, None] == i, y_i[None, :], y)
    return y + tl.where(o[:, None] == o[None, :], 1.0, 0.0)


@triton.jit
def unit_lower_inverse_64(a00, a10, a11, a20, a21, a22, a30, a31, a32, a33):
    """Blocks of (I + A)^{-1} for a strictly lower-triangular 64 x 64 ``A`` given as its ten lower [16, 16] float32
    blocks ``a_ij`` (i >= j; the diagonal blocks strictly lower). Returns the ten lower blocks of the inverse in the
    same order (x00, x10, x11, x20, x21, x22, x30, x31, x32, x33); the upper blocks of the inverse are zero."""
    x00 = unit_lower_inverse_16(a00)
    x11 = unit_lower_inverse_16(a11)
    x22 = unit_lower_inverse_16(a22)
    x33 = unit_lower_inverse_16(a33)
    # first sub-diagonal
    x10 = -tl.dot(x11, tl.dot(a10, x00, input_precision="ieee"), input_precision="ieee")
    x21 = -tl.dot(x22, tl.dot(a21, x11, input_precision="ieee"), input_precision="ieee")
    x32 = -tl.dot(x33, tl.dot(a32, x22, input_precision="ieee"), input_precision="ieee")
    # second sub-diagonal
    x20 = -tl.dot(x22, tl.dot(a20, x00, input_precision="ieee") + tl.dot(a21, x10, input_precision="ieee"),
                  input_precision="ieee")
    x31 = -tl.dot(x33, tl.dot(a31, x11, input_precision="ieee") + tl.dot(a32, x21, input_precision="ieee"),
                  input_precision="ieee")
    # corner
    s30 = tl.dot(a30, x00, input_precision="ieee") + tl.dot(a31, x10, input_precision="ieee") \
        + tl.dot(a32, x20, input_precision="ieee")
    x30 = -tl.dot(x33, s30, input_precision="ieee")
    return x00, x10, x11, x20, x21, x22, x30, x31, x32, x33


@triton.jit
def store_block_16(P, x, start, n_valid, row_block: tl.constexpr, col_block: tl.constexpr, stride_row):
    """Store the [16, 16] tile ``x`` at rows ``16 * row_block`` (+ ``start`` packed rows of stride ``stride_row``)
    and columns ``16 * col_block`` of a [rows, 64] per-chunk matrix; rows past ``n_valid`` are not written."""
    r = row_block * 16 + tl.arange(0, 16)
    c = col_block * 16 + tl.arange(0, 16)
    ptr = P + (start + r)[:, None] * stride_row + c[None, :]
    tl.store(ptr, x.to(P.dtype.element_ty), mask=(r < n_valid)[:, None])


@triton.jit
def store_unit_lower_inverse_64(P, start, n_valid, stride_row, x00, x10, x11, x20, x21, x22, x30, x31, x32, x33):
    """Store all sixteen [16, 16] blocks of a 64 x 64 lower-triangular matrix (zeros above the diagonal blocks)."""
    zero = tl.zeros([16, 16], dtype=tl.float32)
    store_block_16(P, x00, start, n_valid, 0, 0, stride_row)
    store_block_16(P, zero, start, n_valid, 0, 1, stride_row)
    store_block_16(P, zero, start, n_valid, 0, 2, stride_row)
    store_block_16(P, zero, start, n_valid, 0, 3, stride_row)
    store_block_16(P, x10, start, n_valid, 1, 0, stride_row)
    store_block_16(P, x11, start, n_valid, 1, 1, stride_row)
    store_block_16(P, zero, start, n_valid, 1, 2, stride_row)
    store_block_16(P, zero, start, n_valid, 1, 3, stride_row)
    store_block_16(P, x20, start, n_valid, 2, 0, stride_row)
    store_block_16(P, x21, start, n_valid, 2, 1, stride_row)
    store_block_16(P, x22, start, n_valid, 2, 2, stride_row)
    store_block_16(P, zero, start, n_valid, 2, 3, stride_row)
    store_block_16(P, x30, start, n_valid, 3, 0, stride_row)
    store_block_16(P, x31, start, n_valid, 3, 1, stride_row)
    store_block_16(P, x32, start, n_valid, 3, 2, stride_row)
    store_block_16(P, x33, start, n_valid, 3, 3, stride_row)


@triton.jit
def _load_strict_lower_block_16(A, start, n_valid, row_block: tl.constexpr, col_block: tl.constexpr, stride_row):
    r = row_block * 16 + tl.arange(0, 16)
    c = col_block * 16 + tl.arange(0, 16)
    mask = (r < n_valid)[:, None] & (r[:, None] > c[None, :])
    return tl.load(A + (start + r)[:, None] * stride_row + c[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _solve_tril_kernel(A, AI, chunk_indices, cu_seqlens, T, H: tl.constexpr, BT: tl.constexpr,
                       IS_VARLEN: tl.constexpr):
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
    start = bos + i_t * BT
    n_valid = tl.minimum(eos - start, BT).to(tl.int32)
    # row r of head h lives at (start + r) * H * BT + h * BT
    A += i_h * BT
    AI += i_h * BT
    stride = H * BT
    a00 = _load_strict_lower_block_16(A, start, n_valid, 0, 0, stride)
    a10 = _load_strict_lower_block_16(A, start, n_valid, 1, 0, stride)
    a11 = _load_strict_lower_block_16(A, start, n_valid, 1, 1, stride)
    a20 = _load_strict_lower_block_16(A, start, n_valid, 2, 0, stride)
    a21 = _load_strict_lower_block_16(A, start, n_valid, 2, 1, stride)
    a22 = _load_strict_lower_block_16(A, start, n_valid, 2, 2, stride)
    a30 = _load_strict_lower_block_16(A, start, n_valid, 3, 0, stride)
    a31 = _load_strict_lower_block_16(A, start, n_valid, 3, 1, stride)
    a32 = _load_strict_lower_block_16(A, start, n_valid, 3, 2, stride)
    a33 = _load_strict_lower_block_16(A, start, n_valid, 3, 3, stride)
    x00, x10, x11, x20, x21, x22, x30, x31, x32, x33 = unit_lower_inverse_64(a00, a10, a11, a20, a21, a22, a30, a31,
                                                                             a32, a33)
    store_unit_lower_inverse_64(AI, start, n_valid, stride, x00, x10, x11, x20, x21, x22, x30, x31, x32, x33)


def solve_tril(
    A: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_indices: Optional[torch.Tensor] = None,
    output_dtype: Optional[torch.dtype] = torch.float32,
) -> torch.Tensor:
    """(I + A)^{-1} per chunk of 64 tokens and head (Triton; CUDA or the interpreter).

    Args:
        A: [B, T, H, 64]: row t holds row ``t mod 64`` of its chunk's matrix; only the strictly lower entries are
            read (columns past the row, and past the chunk's end, are ignored).
        cu_seqlens: [N + 1] offsets of packed sequences (B = 1): chunks restart at every sequence.
        chunk_indices: ``prepare_chunk_indices(cu_seqlens, 64)`` if already computed.
        output_dtype: dtype of the result (default float32; None keeps A.dtype).

    Returns:
        [B, T, H, 64]: the inverse, lower-triangular with unit diagonal (zeros above it).
    """
    if A.ndim != 4 or A.shape[-1] != 64:
        raise ValueError(f"A must have shape [B, T, H, 64], got {list(A.shape)}")
    B, T, H, BT = A.shape
    A = A.contiguous()
    out = torch.empty_like(A, dtype=output_dtype or A.dtype)
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = prepare_chunk_indices(cu_seqlens, BT)
    num_chunks = B * triton.cdiv(T, BT) if cu_seqlens is None else chunk_indices.shape[0]
    if num_chunks == 0 or H == 0:
        return out
    _solve_tril_kernel[(num_chunks, H)](A, out, chunk_indices, cu_seqlens, T, H=H, BT=BT,
                                        IS_VARLEN=cu_seqlens is not None, num_warps=4)
    return out
