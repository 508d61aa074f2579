"""Triton kernels of causal softmax attention (flash-attention style): forward, and backward as dq + dk/dv kernels.

Layout: q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V], o [B, T, HQ, V]; query head ``hq`` reads kv head
``hq // G`` with G = HQ // H. With ``cu_seqlens`` (B = 1) programs are indexed by (sequence, block inside the
sequence) through ``prepare_chunk_indices`` and never read outside their sequence.

Window ``w``: query i sees keys max(0, i - w + 1) .. i. Key blocks wholly outside a query block's window are skipped;
every loop runs in three ranges (``fla.ops.attn.tiles``): tiles crossing the window edge and tiles crossing the
diagonal or the sequence end are masked, interior tiles (every pair visible) run without a mask.

Numerics: scores in float32 with exp2 (the scale is folded with log2(e)); fp32 accumulators; the base-2 logsumexp
``lse`` [B, HQ, T] (float32) is saved for the backward. Dots take their operands in the input dtype; for float32
inputs they run with ``input_precision='ieee'`` (no tf32), so fp32 results match the reference to ~1e-6.

Backward (no atomics):
    delta = rowsum(o * do)                                   (float32, [B, HQ, T])
    dkdv kernel, per (key block, kv head): loops over the G query heads of the group and over the query blocks that
        see the key block; P^T = exp2(K Q^T * scale * log2(e) - lse) in transposed form:
        dV += P^T dO,   dP^T = V dO^T,   dS^T = P^T * (dP^T - delta),   dK += dS^T Q * scale
    dq kernel, per (query block, q head): dQ = sum_blocks (P * (dO V^T - delta)) K * scale
Transposed operands are ``tl.trans`` of loaded tiles; each tile is loaded once.
Tiles, warps and stages of each kernel come from ``launch_config`` (overridable per call for tuning).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fla.ops.attn.tiles import (dkdv_query_tiles, dq_key_tiles, fwd_key_tiles, load_kv_rows, load_query_tile,
                                query_tile_split)
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

    t0 = i_m * BM
    o_m = t0 + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < T
    m_k = o_k < DK
    m_v = o_v < DV

    b_q = tl.load(Q + (bos + o_m[:, None]) * (HQ * DK) + i_hq * DK + o_k[None, :],
                  mask=m_m[:, None] & m_k[None, :], other=0.0)
    b_mi = tl.full([BM], -1e30, dtype=tl.float32)
    b_li = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BV], dtype=tl.float32)

    hi = tl.minimum(t0 + BM, T)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(t0 - WINDOW + 1, 0) // BN * BN
    b_mi, b_li, b_acc = fwd_key_tiles(b_q, b_mi, b_li, b_acc, K, Vp, K, 0, bos, i_h, o_m, t0, lo, hi, T, WINDOW,
                                      qk_scale, H, DK, DV, BM, BN, BK, BV, USE_WINDOW, False, PRECISION)

    b_li = tl.where(b_li > 0, b_li, 1.0)
    b_o = b_acc / b_li[:, None]
    p_o = O + (bos + o_m[:, None]) * (HQ * DV) + i_hq * DV + o_v[None, :]
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None] & m_v[None, :])
    tl.store(LSE + lse_base + o_m, b_mi + tl.log2(b_li), mask=m_m)  # base 2


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

    j0 = i_n_blk * BN
    o_n = j0 + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_n = o_n < T
    m_k = o_k < DK
    m_v = o_v < DV

    b_k, b_v = load_kv_rows(K, Vp, bos + o_n, m_n, i_h, H, DK, DV, BK, BV, True)
    b_dk = tl.zeros([BN, BK], dtype=tl.float32)
    b_dv = tl.zeros([BN, BV], dtype=tl.float32)

    lo = j0 // BM * BM
    hi = T
    if USE_WINDOW:
        hi = tl.minimum(T, j0 + BN - 1 + WINDOW)
    mid_lo, mid_hi = query_tile_split(j0, lo, hi, T, WINDOW, BM, BN, USE_WINDOW)
    for i_g in range(G):
        i_hq = i_h * G + i_g
        lse_base = (i_b * HQ + i_hq).to(tl.int64) * T_full + lse_off
        b_dk, b_dv = dkdv_query_tiles(b_k, b_v, b_dk, b_dv, Q, DO, LSE, DELTA, K, 0, lse_base, bos, i_hq, o_n,
                                      mid_lo, mid_hi, lo, hi, T, WINDOW, qk_scale, HQ, DK, DV, BM, BK, BV, USE_WINDOW,
                                      False, PRECISION)

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

    t0 = i_m * BM
    o_m = t0 + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    m_m = o_m < T
    m_k = o_k < DK

    b_q, b_do, b_lse, b_delta = load_query_tile(Q, DO, LSE, DELTA, bos, i_hq, lse_base, o_m, T, HQ, DK, DV, BK, BV,
                                                True)
    b_dq = tl.zeros([BM, BK], dtype=tl.float32)

    hi = tl.minimum(t0 + BM, T)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(t0 - WINDOW + 1, 0) // BN * BN
    b_dq = dq_key_tiles(b_q, b_do, b_lse, b_delta, b_dq, K, Vp, K, 0, bos, i_h, o_m, t0, lo, hi, T, WINDOW, qk_scale,
                        H, DK, DV, BM, BN, BK, BV, USE_WINDOW, False, PRECISION)

    b_dq = b_dq * scale
    tl.store(DQ + (bos + o_m[:, None]) * (HQ * DK) + i_hq * DK + o_k[None, :],
             b_dq.to(DQ.dtype.element_ty), mask=m_m[:, None] & m_k[None, :])


Config = Tuple[int, int, int, int]


def launch_config(kernel: str, DK: int, DV: int, windowed: bool = False, fp32: bool = False) -> Config:
    """(BM, BN, num_warps, num_stages) of one kernel: ``kernel`` in 'fwd', 'dkdv', 'dq' (BM: query tile, BN: key
    tile); ``windowed``: a sliding window (fewer tiles per row, more of them masked); ``fp32``: float32 inputs
    (ieee dots: twice the registers per tile). The one place tiles are chosen; ``attn_fwd`` / ``attn_bwd`` take
    overrides for tuning.

    - bf16 / fp16, head dims <= 64 (the paper's models): the fastest correct candidates of
      ``python -m benchmarks.ops.tune_attn`` on an H200 (B8-T4096-H16-D64 and HQ32-H8;
      ``benchmarks/results/ops/tune_attn*.txt``).
    - float32, and head dims up to 128: tiles that compile without register spills (or with a few hundred bytes)
      for sm_90 (``python -m benchmarks.ops.kernel_resources``); larger tiles spilled up to 78 KB per thread, and
      ptxas then took minutes per kernel. Chosen statically, not timed.
    - wider heads: the configurations their interpreter tests use at GPU size (not run on a GPU).
    Under the interpreter, small unequal tiles so that tests at T <= 130 cross masked and interior tiles."""
    if triton_interpreting():
        return {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}[kernel]
    D = max(DK, DV)
    if fp32 and D <= 128:
        if kernel == "fwd":
            return 32, 64, 8, 2
        if D <= 64:
            return (16, 32, 4, 2) if kernel == "dkdv" else (32, 32, 4, 2)
        return (16, 16, 4, 2) if kernel == "dkdv" else (32, 16, 4, 2)
    if D <= 64:
        if kernel == "fwd":
            return (64, 64, 4, 3) if windowed else (128, 64, 8, 3)
        # dkdv (64, 128, 4, 3) was 2% faster than (32, 64, 4, 3) for full MHA but 4x slower with GQA (HQ32-H8)
        return (32, 64, 4, 3) if kernel == "dkdv" else (64, 32, 4, 3)
    if D <= 128:
        return {"fwd": (64, 64, 8, 2), "dkdv": (16, 32, 4, 2), "dq": (32, 32, 4, 2)}[kernel]
    return (64, 32, 8, 2) if kernel == "fwd" else (32, 32, 8, 1)


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


def attn_fwd(q, k, v, scale: float, window_size: Optional[int], cu_seqlens: Optional[torch.Tensor],
             config: Optional[Config] = None):
    """q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V] contiguous
    -> (o [B, T, HQ, V] in q.dtype, lse [B, HQ, T] float32, base 2). ``config``: (BM, BN, num_warps, num_stages),
    default ``launch_config('fwd', ...)``."""
    B, T, HQ, DK = q.shape
    H, DV = k.shape[2], v.shape[-1]
    o = torch.empty((B, T, HQ, DV), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, HQ, T), device=q.device, dtype=torch.float32)
    if B * T == 0:
        return o, lse
    fp32 = q.dtype == torch.float32
    BM, BN, num_warps, num_stages = config or launch_config("fwd", DK, DV, window_size is not None, fp32)
    BK, BV = _dims(q, v)
    n_blocks, chunk_indices = _grid_rows(cu_seqlens, T, BM)
    _attn_fwd_kernel[(n_blocks, B * HQ)](
        q, k, v, o, lse, cu_seqlens, chunk_indices, scale * LOG2E, T, window_size or 1,
        HQ=HQ, H=H, G=HQ // H, DK=DK, DV=DV, BM=BM, BN=BN, BK=BK, BV=BV,
        IS_VARLEN=cu_seqlens is not None, USE_WINDOW=window_size is not None, PRECISION=_precision(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse


def attn_bwd(q, k, v, o, lse, do, scale: float, window_size: Optional[int], cu_seqlens: Optional[torch.Tensor],
             dkdv_config: Optional[Config] = None, dq_config: Optional[Config] = None):
    """Gradients (dq, dk, dv) in the dtypes of q, k, v; all inputs contiguous; ``lse`` base 2 as ``attn_fwd``
    returns it. Config overrides as ``attn_fwd``'s (defaults from ``launch_config``)."""
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

    fp32 = q.dtype == torch.float32
    common = dict(HQ=HQ, H=H, G=HQ // H, DK=DK, DV=DV, BK=BK, BV=BV, IS_VARLEN=cu_seqlens is not None,
                  USE_WINDOW=window_size is not None, PRECISION=_precision(q))
    BM, BN, num_warps, num_stages = dkdv_config or launch_config("dkdv", DK, DV, window_size is not None, fp32)
    n_kblocks, k_chunks = _grid_rows(cu_seqlens, T, BN)
    _attn_bwd_dkdv_kernel[(n_kblocks, B * H)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, k_chunks, scale * LOG2E, scale, T, window_size or 1,
        BM=BM, BN=BN, num_warps=num_warps, num_stages=num_stages, **common)
    BM, BN, num_warps, num_stages = dq_config or launch_config("dq", DK, DV, window_size is not None, fp32)
    n_qblocks, q_chunks = _grid_rows(cu_seqlens, T, BM)
    _attn_bwd_dq_kernel[(n_qblocks, B * HQ)](
        q, k, v, do, lse, delta, dq, cu_seqlens, q_chunks, scale * LOG2E, scale, T, window_size or 1,
        BM=BM, BN=BN, num_warps=num_warps, num_stages=num_stages, **common)
    return dq, dk, dv
