"""Triton kernels of causal softmax attention (flash-attention style): forward, and backward as dq + dk/dv kernels.

Layout: q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V], o [B, T, HQ, V]; query head ``hq`` reads kv head
``hq // G`` with G = HQ // H. With ``cu_seqlens`` (B = 1) programs are indexed by (sequence, block inside the
sequence) through ``prepare_chunk_indices`` and never read outside their sequence.

Window ``w``: query i sees keys max(0, i - w + 1) .. i. Key blocks wholly outside a query block's window are skipped.

Numerics: scores in float32 with exp2 (the scale is folded with log2(e)); fp32 accumulators; the logsumexp
``lse`` [B, HQ, T] (natural log, float32) is saved for the backward. Dots take their operands in the input dtype;
for float32 inputs they run with ``input_precision='ieee'`` (no tf32), so fp32 results match the reference to ~1e-6.

Backward (no atomics):
    delta = rowsum(o * do)                                   (float32, [B, HQ, T])
    dkdv kernel, per (key block, kv head): loops over the G query heads of the group and over the query blocks that
        see the key block;  computes P^T = exp(K Q^T * scale - lse) directly in transposed form (Q^T and dO^T are
        loaded transposed from memory, never produced by tl.trans of a dot result):
        dV += P^T dO,   dP^T = V dO^T,   dS^T = P^T * (dP^T - delta),   dK += dS^T Q * scale
    dq kernel, per (query block, q head): dQ = sum_blocks (P * (dO V^T - delta)) K * scale
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fla.ops.utils.index import prepare_chunk_indices
from fla.utils import triton_interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _block_span(i_blk, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN: tl.constexpr):
    """Program block ``i_blk`` of batch row ``i_b`` -> (block index inside its sequence, first packed row of the
    sequence (int64), sequence length). With ``cu_seqlens`` the block comes from ``chunk_indices`` [.., 2]."""
    if IS_VARLEN:
        i_seq = tl.load(chunk_indices + i_blk * 2).to(tl.int32)
        i_blk = tl.load(chunk_indices + i_blk * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_seq).to(tl.int64)
        eos = tl.load(cu_seqlens + i_seq + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
    else:
        bos = (i_b * T).to(tl.int64)
    return i_blk, bos, T


@triton.jit
def _attn_fwd_kernel(
    Q, K, Vp, O, LSE, cu_seqlens, chunk_indices, qk_scale, T, WINDOW,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_hq = i_bh % HQ
    i_h = i_hq // G
    T_full = T
    i_m, bos, T = _block_span(i_m, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    lse_base = (i_b * HQ + i_hq).to(tl.int64) * T_full + (bos - i_b * T_full)

    o_m = i_m * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < T
    m_k = o_k < DK
    m_v = o_v < DV

    p_q = Q + (bos + o_m[:, None]) * (HQ * DK) + i_hq * DK + o_k[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & m_k[None, :], other=0.0)

    b_mi = tl.full([BM], -1e30, dtype=tl.float32)
    b_li = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BV], dtype=tl.float32)

    hi = tl.minimum((i_m + 1) * BM, T)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(i_m * BM - WINDOW + 1, 0) // BN * BN
    for start in range(lo, hi, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < T
        # K^T tile [BK, BN], loaded transposed
        p_kt = K + (bos + o_n[None, :]) * (H * DK) + i_h * DK + o_k[:, None]
        b_kt = tl.load(p_kt, mask=m_k[:, None] & m_n[None, :], other=0.0)
        p_v = Vp + (bos + o_n[:, None]) * (H * DV) + i_h * DV + o_v[None, :]
        b_v = tl.load(p_v, mask=m_n[:, None] & m_v[None, :], other=0.0)

        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
        allowed = (o_n[None, :] <= o_m[:, None]) & m_n[None, :]
        if USE_WINDOW:
            allowed = allowed & (o_m[:, None] - o_n[None, :] < WINDOW)
        b_s = tl.where(allowed, b_s, float("-inf"))
        b_mnew = tl.maximum(b_mi, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mnew[:, None])
        b_alpha = tl.exp2(b_mi - b_mnew)
        b_li = b_li * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        b_mi = b_mnew

    b_li = tl.where(b_li > 0, b_li, 1.0)
    b_o = b_acc / b_li[:, None]
    p_o = O + (bos + o_m[:, None]) * (HQ * DV) + i_hq * DV + o_v[None, :]
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None] & m_v[None, :])
    b_lse = (b_mi + tl.log2(b_li)) * 0.6931471805599453
    tl.store(LSE + lse_base + o_m, b_lse, mask=m_m)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, M, HQ: tl.constexpr, DV: tl.constexpr, T_full,
                                BR: tl.constexpr, BV: tl.constexpr):
    """delta[b, hq, t] = sum_v o[b, t, hq, v] * do[b, t, hq, v]; rows r = (b * T + t) * HQ + hq."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_v = tl.arange(0, BV)
    m_r = o_r < M
    mask = m_r[:, None] & (o_v < DV)[None, :]
    b_o = tl.load(O + o_r[:, None] * DV + o_v[None, :], mask=mask, other=0.0).to(tl.float32)
    b_do = tl.load(DO + o_r[:, None] * DV + o_v[None, :], mask=mask, other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    i_hq = o_r % HQ
    i_bt = o_r // HQ
    i_b = i_bt // T_full
    i_t = i_bt % T_full
    tl.store(DELTA + (i_b * HQ + i_hq) * T_full + i_t, b_delta, mask=m_r)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, Vp, DO, LSE, DELTA, DK_out, DV_out, cu_seqlens, chunk_indices, qk_scale, scale, T, WINDOW,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    i_n_blk = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    T_full = T
    i_n_blk, bos, T = _block_span(i_n_blk, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    lse_off = bos - i_b * T_full

    o_n = i_n_blk * BN + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_n = o_n < T
    m_k = o_k < DK
    m_v = o_v < DV

    b_k = tl.load(K + (bos + o_n[:, None]) * (H * DK) + i_h * DK + o_k[None, :],
                  mask=m_n[:, None] & m_k[None, :], other=0.0)
    b_v = tl.load(Vp + (bos + o_n[:, None]) * (H * DV) + i_h * DV + o_v[None, :],
                  mask=m_n[:, None] & m_v[None, :], other=0.0)
    b_dk = tl.zeros([BN, BK], dtype=tl.float32)
    b_dv = tl.zeros([BN, BV], dtype=tl.float32)

    lo = (i_n_blk * BN) // BM * BM
    hi = T
    if USE_WINDOW:
        hi = tl.minimum(T, (i_n_blk + 1) * BN - 1 + WINDOW)
    for i_g in range(G):
        i_hq = i_h * G + i_g
        lse_base = (i_b * HQ + i_hq).to(tl.int64) * T_full + lse_off
        for start in range(lo, hi, BM):
            o_m = start + tl.arange(0, BM)
            m_m = o_m < T
            # Q^T [BK, BM] and dO^T [BV, BM] loaded transposed; Q [BM, BK] and dO [BM, BV] loaded as stored
            p_qt = Q + (bos + o_m[None, :]) * (HQ * DK) + i_hq * DK + o_k[:, None]
            b_qt = tl.load(p_qt, mask=m_k[:, None] & m_m[None, :], other=0.0)
            p_q = Q + (bos + o_m[:, None]) * (HQ * DK) + i_hq * DK + o_k[None, :]
            b_q = tl.load(p_q, mask=m_m[:, None] & m_k[None, :], other=0.0)
            p_dot = DO + (bos + o_m[None, :]) * (HQ * DV) + i_hq * DV + o_v[:, None]
            b_dot = tl.load(p_dot, mask=m_v[:, None] & m_m[None, :], other=0.0)
            p_do = DO + (bos + o_m[:, None]) * (HQ * DV) + i_hq * DV + o_v[None, :]
            b_do = tl.load(p_do, mask=m_m[:, None] & m_v[None, :], other=0.0)
            b_lse = tl.load(LSE + lse_base + o_m, mask=m_m, other=0.0) * 1.4426950408889634
            b_delta = tl.load(DELTA + lse_base + o_m, mask=m_m, other=0.0)

            b_st = tl.dot(b_k, b_qt, input_precision=PRECISION) * qk_scale  # [BN, BM]
            allowed = (o_n[:, None] <= o_m[None, :]) & m_m[None, :] & m_n[:, None]
            if USE_WINDOW:
                allowed = allowed & (o_m[None, :] - o_n[:, None] < WINDOW)
            b_pt = tl.where(allowed, tl.exp2(b_st - b_lse[None, :]), 0.0)
            b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
            b_dpt = tl.dot(b_v, b_dot, input_precision=PRECISION)  # [BN, BM]
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)

    b_dk = b_dk * scale
    tl.store(DK_out + (bos + o_n[:, None]) * (H * DK) + i_h * DK + o_k[None, :],
             b_dk.to(DK_out.dtype.element_ty), mask=m_n[:, None] & m_k[None, :])
    tl.store(DV_out + (bos + o_n[:, None]) * (H * DV) + i_h * DV + o_v[None, :],
             b_dv.to(DV_out.dtype.element_ty), mask=m_n[:, None] & m_v[None, :])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, Vp, DO, LSE, DELTA, DQ, cu_seqlens, chunk_indices, qk_scale, scale, T, WINDOW,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_hq = i_bh % HQ
    i_h = i_hq // G
    T_full = T
    i_m, bos, T = _block_span(i_m, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    lse_base = (i_b * HQ + i_hq).to(tl.int64) * T_full + (bos - i_b * T_full)

    o_m = i_m * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < T
    m_k = o_k < DK
    m_v = o_v < DV

    b_q = tl.load(Q + (bos + o_m[:, None]) * (HQ * DK) + i_hq * DK + o_k[None, :],
                  mask=m_m[:, None] & m_k[None, :], other=0.0)
    b_do = tl.load(DO + (bos + o_m[:, None]) * (HQ * DV) + i_hq * DV + o_v[None, :],
                   mask=m_m[:, None] & m_v[None, :], other=0.0)
    b_lse = tl.load(LSE + lse_base + o_m, mask=m_m, other=0.0) * 1.4426950408889634
    b_delta = tl.load(DELTA + lse_base + o_m, mask=m_m, other=0.0)
    b_dq = tl.zeros([BM, BK], dtype=tl.float32)

    hi = tl.minimum((i_m + 1) * BM, T)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(i_m * BM - WINDOW + 1, 0) // BN * BN
    for start in range(lo, hi, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < T
        b_kt = tl.load(K + (bos + o_n[None, :]) * (H * DK) + i_h * DK + o_k[:, None],
                       mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_k = tl.load(K + (bos + o_n[:, None]) * (H * DK) + i_h * DK + o_k[None, :],
                      mask=m_n[:, None] & m_k[None, :], other=0.0)
        b_vt = tl.load(Vp + (bos + o_n[None, :]) * (H * DV) + i_h * DV + o_v[:, None],
                       mask=m_v[:, None] & m_n[None, :], other=0.0)
        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
        allowed = (o_n[None, :] <= o_m[:, None]) & m_n[None, :] & m_m[:, None]
        if USE_WINDOW:
            allowed = allowed & (o_m[:, None] - o_n[None, :] < WINDOW)
        b_p = tl.where(allowed, tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)

    b_dq = b_dq * scale
    tl.store(DQ + (bos + o_m[:, None]) * (HQ * DK) + i_hq * DK + o_k[None, :],
             b_dq.to(DQ.dtype.element_ty), mask=m_m[:, None] & m_k[None, :])


def _config(q: torch.Tensor) -> Tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) of the forward; small blocks under the interpreter (tests exercise several
    blocks per sequence at T <= 128)."""
    if triton_interpreting():
        return 32, 16, 4, 1
    return 64, 64, 4, 2


def _bwd_config(q: torch.Tensor) -> Tuple[int, int, int, int]:
    if triton_interpreting():
        return 16, 32, 4, 1
    # num_warps=8: FLA #984 saw Hopper miscompiles of a backward at num_warps=4 (to be proven on the GPU)
    return 64, 64, 8, 1


def _dims(q: torch.Tensor, v: torch.Tensor) -> Tuple[int, int]:
    return max(16, triton.next_power_of_2(q.shape[-1])), max(16, triton.next_power_of_2(v.shape[-1]))


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _grid_rows(cu_seqlens: Optional[torch.Tensor], T: int, block: int):
    """(number of row blocks, chunk_indices or None)."""
    if cu_seqlens is None:
        return triton.cdiv(T, block), None
    chunk_indices = prepare_chunk_indices(cu_seqlens.long(), block).to(torch.int32).contiguous()
    return chunk_indices.shape[0], chunk_indices


def attn_fwd(q, k, v, scale: float, window_size: Optional[int], cu_seqlens: Optional[torch.Tensor]):
    """q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V] contiguous
    -> (o [B, T, HQ, V] in q.dtype, lse [B, HQ, T] float32, natural log)."""
    B, T, HQ, DK = q.shape
    H, DV = k.shape[2], v.shape[-1]
    o = torch.empty((B, T, HQ, DV), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, HQ, T), device=q.device, dtype=torch.float32)
    if B * T == 0:
        return o, lse
    BM, BN, num_warps, num_stages = _config(q)
    BK, BV = _dims(q, v)
    n_blocks, chunk_indices = _grid_rows(cu_seqlens, T, BM)
    _attn_fwd_kernel[(n_blocks, B * HQ)](
        q, k, v, o, lse, cu_seqlens, chunk_indices, scale * LOG2E, T, window_size or 1,
        HQ=HQ, H=H, G=HQ // H, DK=DK, DV=DV, BM=BM, BN=BN, BK=BK, BV=BV,
        IS_VARLEN=cu_seqlens is not None, USE_WINDOW=window_size is not None, PRECISION=_precision(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse


def attn_bwd(q, k, v, o, lse, do, scale: float, window_size: Optional[int], cu_seqlens: Optional[torch.Tensor]):
    """Gradients (dq, dk, dv) in the dtypes of q, k, v; all inputs contiguous."""
    B, T, HQ, DK = q.shape
    H, DV = k.shape[2], v.shape[-1]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if B * T == 0:
        return dq, dk, dv
    delta = torch.empty((B, HQ, T), device=q.device, dtype=torch.float32)
    BK, BV = _dims(q, v)
    M = B * T * HQ
    BR = max(1, min(64, 4096 // BV))
    _attn_bwd_preprocess_kernel[(triton.cdiv(M, BR),)](o, do, delta, M, HQ=HQ, DV=DV, T_full=T, BR=BR, BV=BV)

    BM, BN, num_warps, num_stages = _bwd_config(q)
    common = dict(HQ=HQ, H=H, G=HQ // H, DK=DK, DV=DV, BM=BM, BN=BN, BK=BK, BV=BV,
                  IS_VARLEN=cu_seqlens is not None, USE_WINDOW=window_size is not None, PRECISION=_precision(q),
                  num_warps=num_warps, num_stages=num_stages)
    n_kblocks, k_chunks = _grid_rows(cu_seqlens, T, BN)
    _attn_bwd_dkdv_kernel[(n_kblocks, B * H)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, k_chunks, scale * LOG2E, scale, T, window_size or 1, **common)
    n_qblocks, q_chunks = _grid_rows(cu_seqlens, T, BM)
    _attn_bwd_dq_kernel[(n_qblocks, B * HQ)](
        q, k, v, do, lse, delta, dq, cu_seqlens, q_chunks, scale * LOG2E, scale, T, window_size or 1, **common)
    return dq, dk, dv
