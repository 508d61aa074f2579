"""WY (UT) representation of one chunk of the gated delta rule: forward kernels.

Per chunk of BT = 64 tokens and head, with ``g`` the within-chunk cumulative log-decay (float32):

    A[r, s]  = beta_r (k_r . k_s) exp(g_r - g_s)      for r > s, else 0        (strictly lower, [BT, BT])
    Ai       = (I + A)^{-1}                                                     (``chunk_scaled_dot_kkt_solve``)
    W        = Ai (beta exp(g) * K)        [BT, K]                              (``recompute_w_u``)
    U        = Ai (beta * V)               [BT, V]

so that the chunk's pseudo-values are ``U - W h`` for the chunk-start state h (see ``chunk_h.py``).
``Ai`` is stored in the compute dtype of q/k/v (it feeds tensor-core products); W and U too.
Rows past the end of a sequence are read as zeros and never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla.ops.gated_delta_rule.chunk_common import Chunking, block_k, chunk_launch, chunk_span, dot_precision
from fla.ops.utils.solve_tril import store_unit_lower_inverse_64, unit_lower_inverse_64


@triton.jit
def _load_rows_16(X, start, n_valid, row_block: tl.constexpr, o_d, m_d, stride_row):
    """Rows 16 * row_block .. +16 of the chunk, columns o_d: a [16, BD] tile (zeros outside)."""
    r = row_block * 16 + tl.arange(0, 16)
    ptr = X + (start + r)[:, None] * stride_row + o_d[None, :]
    return tl.load(ptr, mask=(r < n_valid)[:, None] & m_d[None, :], other=0.0)


@triton.jit
def _load_rows_16_transposed(X, start, n_valid, row_block: tl.constexpr, o_d, m_d, stride_row):
    """The same rows as ``_load_rows_16`` read as a [BD, 16] tile (transposed by addressing, not by tl.trans)."""
    r = row_block * 16 + tl.arange(0, 16)
    ptr = X + (start + r)[None, :] * stride_row + o_d[:, None]
    return tl.load(ptr, mask=(r < n_valid)[None, :] & m_d[:, None], other=0.0)


@triton.jit
def _scale_block(acc, G, BETA, start, n_valid, row_block: tl.constexpr, col_block: tl.constexpr, stride_row):
    """acc[r, s] * beta_r * exp(g_r - g_s) on the strictly lower part of the chunk's matrix, 0 elsewhere."""
    r = row_block * 16 + tl.arange(0, 16)
    c = col_block * 16 + tl.arange(0, 16)
    m_r = r < n_valid
    m_c = c < n_valid
    g_r = tl.load(G + (start + r) * stride_row, mask=m_r, other=0.0)
    g_c = tl.load(G + (start + c) * stride_row, mask=m_c, other=0.0)
    b_r = tl.load(BETA + (start + r) * stride_row, mask=m_r, other=0.0).to(tl.float32)
    mask = (r[:, None] > c[None, :]) & m_r[:, None] & m_c[None, :]
    # the exponent is masked before exp: past the chunk's end g reads 0 and g_r - g_s could overflow
    decay = tl.exp(tl.where(mask, g_r[:, None] - g_c[None, :], 0.0))
    return tl.where(mask, acc * decay * b_r[:, None], 0.0)


@triton.jit
def _kkt_solve_kernel(K, G, BETA, AI, chunk_indices, cu_seqlens, T, H: tl.constexpr, D_K: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    # one program per (chunk, head): the ten lower 16 x 16 blocks of A, then their inverse, never leaving registers
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start, n_valid = chunk_span(i_c, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    K += i_h * D_K
    G += i_h
    BETA += i_h
    AI += i_h * BT
    a00 = tl.zeros([16, 16], dtype=tl.float32)
    a10 = tl.zeros([16, 16], dtype=tl.float32)
    a11 = tl.zeros([16, 16], dtype=tl.float32)
    a20 = tl.zeros([16, 16], dtype=tl.float32)
    a21 = tl.zeros([16, 16], dtype=tl.float32)
    a22 = tl.zeros([16, 16], dtype=tl.float32)
    a30 = tl.zeros([16, 16], dtype=tl.float32)
    a31 = tl.zeros([16, 16], dtype=tl.float32)
    a32 = tl.zeros([16, 16], dtype=tl.float32)
    a33 = tl.zeros([16, 16], dtype=tl.float32)
    for i_k in range(tl.cdiv(D_K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < D_K
        k0 = _load_rows_16(K, start, n_valid, 0, o_k, m_k, H * D_K)
        k1 = _load_rows_16(K, start, n_valid, 1, o_k, m_k, H * D_K)
        k2 = _load_rows_16(K, start, n_valid, 2, o_k, m_k, H * D_K)
        k3 = _load_rows_16(K, start, n_valid, 3, o_k, m_k, H * D_K)
        kt0 = _load_rows_16_transposed(K, start, n_valid, 0, o_k, m_k, H * D_K)
        kt1 = _load_rows_16_transposed(K, start, n_valid, 1, o_k, m_k, H * D_K)
        kt2 = _load_rows_16_transposed(K, start, n_valid, 2, o_k, m_k, H * D_K)
        kt3 = _load_rows_16_transposed(K, start, n_valid, 3, o_k, m_k, H * D_K)
        a00 += tl.dot(k0, kt0, input_precision=PREC)
        a10 += tl.dot(k1, kt0, input_precision=PREC)
        a11 += tl.dot(k1, kt1, input_precision=PREC)
        a20 += tl.dot(k2, kt0, input_precision=PREC)
        a21 += tl.dot(k2, kt1, input_precision=PREC)
        a22 += tl.dot(k2, kt2, input_precision=PREC)
        a30 += tl.dot(k3, kt0, input_precision=PREC)
        a31 += tl.dot(k3, kt1, input_precision=PREC)
        a32 += tl.dot(k3, kt2, input_precision=PREC)
        a33 += tl.dot(k3, kt3, input_precision=PREC)
    a00 = _scale_block(a00, G, BETA, start, n_valid, 0, 0, H)
    a10 = _scale_block(a10, G, BETA, start, n_valid, 1, 0, H)
    a11 = _scale_block(a11, G, BETA, start, n_valid, 1, 1, H)
    a20 = _scale_block(a20, G, BETA, start, n_valid, 2, 0, H)
    a21 = _scale_block(a21, G, BETA, start, n_valid, 2, 1, H)
    a22 = _scale_block(a22, G, BETA, start, n_valid, 2, 2, H)
    a30 = _scale_block(a30, G, BETA, start, n_valid, 3, 0, H)
    a31 = _scale_block(a31, G, BETA, start, n_valid, 3, 1, H)
    a32 = _scale_block(a32, G, BETA, start, n_valid, 3, 2, H)
    a33 = _scale_block(a33, G, BETA, start, n_valid, 3, 3, H)
    x00, x10, x11, x20, x21, x22, x30, x31, x32, x33 = unit_lower_inverse_64(a00, a10, a11, a20, a21, a22, a30, a31,
                                                                             a32, a33)
    store_unit_lower_inverse_64(AI, start, n_valid, H * BT, x00, x10, x11, x20, x21, x22, x30, x31, x32, x33)


@triton.jit
def _recompute_w_u_kernel(K, V, G, BETA, AI, W, U, chunk_indices, cu_seqlens, T, H: tl.constexpr,
                          D_K: tl.constexpr, D_V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    # one program per (chunk, head); W and U rows are independent products of the same Ai
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start, n_valid = chunk_span(i_c, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    m_t = o_t < n_valid
    rows = start + o_t
    b = tl.load(BETA + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    g = tl.load(G + rows * H + i_h, mask=m_t, other=0.0)
    bg = tl.where(m_t, b * tl.exp(g), 0.0)
    ai = tl.load(AI + (rows * H + i_h)[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
    DT = ai.dtype
    for i_k in range(tl.cdiv(D_K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        mask = m_t[:, None] & (o_k < D_K)[None, :]
        off = (rows * H + i_h)[:, None] * D_K + o_k[None, :]
        k = tl.load(K + off, mask=mask, other=0.0).to(tl.float32)
        w = tl.dot(ai, (k * bg[:, None]).to(DT), input_precision=PREC)
        tl.store(W + off, w.to(W.dtype.element_ty), mask=mask)
    for i_v in range(tl.cdiv(D_V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        mask = m_t[:, None] & (o_v < D_V)[None, :]
        off = (rows * H + i_h)[:, None] * D_V + o_v[None, :]
        v = tl.load(V + off, mask=mask, other=0.0).to(tl.float32)
        u = tl.dot(ai, (v * b[:, None]).to(DT), input_precision=PREC)
        tl.store(U + off, u.to(U.dtype.element_ty), mask=mask)


def chunk_scaled_dot_kkt_solve(k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                               chunking: Chunking) -> torch.Tensor:
    """Ai = (I + A)^{-1}, A[r, s] = beta_r (k_r . k_s) exp(g_r - g_s) (r > s) per chunk and head.

    k: [B, T, H, K] contiguous; g: [B, T, H] float32 within-chunk cumulative log-decay; beta: [B, T, H].
    Returns Ai [B, T, H, 64] in k.dtype (row t holds row t mod 64 of its chunk's inverse).
    """
    B, T, H, D_K = k.shape
    BT = chunking.chunk_size
    ai = torch.empty(B, T, H, BT, device=k.device, dtype=k.dtype)
    if chunking.num_chunks == 0:
        return ai
    block, launch = chunk_launch("kkt_solve", k.dtype)
    BK = block_k(D_K, block)
    _kkt_solve_kernel[(chunking.num_chunks, H)](
        k, g, beta, ai, chunking.chunk_indices, chunking.cu_seqlens, T, H=H, D_K=D_K, BT=BT, BK=BK,
        IS_VARLEN=chunking.is_varlen, PREC=dot_precision(k.dtype), **launch,
    )
    return ai


def recompute_w_u(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, ai: torch.Tensor,
                  chunking: Chunking):
    """W = Ai (beta exp(g) * K) [B, T, H, K] and U = Ai (beta * V) [B, T, H, V], both in k.dtype."""
    B, T, H, D_K = k.shape
    D_V = v.shape[-1]
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    if chunking.num_chunks == 0:
        return w, u
    block, launch = chunk_launch("w_u", k.dtype)
    _recompute_w_u_kernel[(chunking.num_chunks, H)](
        k, v, g, beta, ai, w, u, chunking.chunk_indices, chunking.cu_seqlens, T, H=H, D_K=D_K, D_V=D_V,
        BT=chunking.chunk_size, BK=block_k(D_K, block), BV=block_k(D_V, block), IS_VARLEN=chunking.is_varlen,
        PREC=dot_precision(k.dtype), **launch,
    )
    return w, u
