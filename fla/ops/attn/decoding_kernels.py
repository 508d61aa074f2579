"""Triton kernels of one decoding step of causal softmax attention against a left-padded KV cache (split-K, as in
flash-decoding).

Row b's query head hq attends to keys ``max(seq_start[b], S - window) .. S - 1`` of kv head ``hq // G``. The cache
range that any row can see (the last ``min(S, window)`` positions) is cut into NS splits of SPLIT keys:

1. ``_attn_decoding_split_kernel``, one program per (row, query head, split): streams its split in blocks of BS keys
   with an online softmax in float32 and writes the partial (max m, sum l, unnormalised acc [V]) to a workspace;
2. ``_attn_decoding_combine_kernel``, one program per (row, query head): merges the NS partials,
   o = sum_j exp(m_j - M) acc_j / sum_j exp(m_j - M) l_j (zeros for a row with no valid key).

q [B, 1, HQ, K], caches k [B, S, H, K], v [B, S, H, V] (any strides along B and S; heads and features contiguous).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fla.utils import triton_interpreting


@triton.jit
def _attn_decoding_split_kernel(
    Q, K, Vp, M_ws, L_ws, ACC_ws, seq_start, scale, S, BASE, SPLIT, NS, WINDOW,
    stride_kb, stride_ks, stride_vb, stride_vs,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_START: tl.constexpr, USE_WINDOW: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_sp = tl.program_id(1)
    i_b = (i_bh // HQ).to(tl.int64)
    i_hq = i_bh % HQ
    i_h = i_hq // G
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV

    b_q = tl.load(Q + (i_b * HQ + i_hq) * DK + o_k, mask=m_k, other=0.0).to(tl.float32) * (scale * 1.4426950408889634)
    lo = BASE + i_sp * SPLIT
    hi = tl.minimum(lo + SPLIT, S)
    if HAS_START:
        lo = tl.maximum(lo, tl.load(seq_start + i_b).to(tl.int32))
    if USE_WINDOW:
        lo = tl.maximum(lo, S - WINDOW)

    b_m = tl.max(tl.full([BS], -1e30, dtype=tl.float32), 0)  # running max (finite start: no inf - inf)
    b_l = tl.zeros([], dtype=tl.float32)
    b_acc = tl.zeros([BV], dtype=tl.float32)
    p_k0 = K + i_b * stride_kb + i_h * DK
    p_v0 = Vp + i_b * stride_vb + i_h * DV
    for start in range(lo, hi, BS):
        o_s = start + tl.arange(0, BS)
        m_s = o_s < hi
        b_k = tl.load(p_k0 + o_s[:, None].to(tl.int64) * stride_ks + o_k[None, :],
                      mask=m_s[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_s = tl.sum(b_k * b_q[None, :], 1)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_mnew = tl.maximum(b_m, tl.max(b_s, 0))
        b_p = tl.exp2(b_s - b_mnew)
        b_alpha = tl.exp2(b_m - b_mnew)
        b_v = tl.load(p_v0 + o_s[:, None].to(tl.int64) * stride_vs + o_v[None, :],
                      mask=m_s[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_l = b_l * b_alpha + tl.sum(b_p, 0)
        b_acc = b_acc * b_alpha + tl.sum(b_p[:, None] * b_v, 0)
        b_m = b_mnew

    i_ws = i_bh.to(tl.int64) * NS + i_sp
    tl.store(M_ws + i_ws, b_m)
    tl.store(L_ws + i_ws, b_l)
    tl.store(ACC_ws + i_ws * DV + o_v, b_acc, mask=m_v)


@triton.jit
def _attn_decoding_combine_kernel(M_ws, L_ws, ACC_ws, O, NS, DV: tl.constexpr, BNS: tl.constexpr, BV: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    o_j = tl.arange(0, BNS)
    o_v = tl.arange(0, BV)
    m_j = o_j < NS
    m_v = o_v < DV
    b_m = tl.load(M_ws + i_bh * NS + o_j, mask=m_j, other=-1e30)
    b_l = tl.load(L_ws + i_bh * NS + o_j, mask=m_j, other=0.0)
    b_acc = tl.load(ACC_ws + (i_bh * NS + o_j[:, None]) * DV + o_v[None, :], mask=m_j[:, None] & m_v[None, :],
                    other=0.0)
    b_w = tl.exp2(b_m - tl.max(b_m, 0))
    b_w = tl.where(m_j, b_w, 0.0)
    b_lsum = tl.sum(b_l * b_w, 0)
    b_o = tl.sum(b_acc * b_w[:, None], 0) / tl.where(b_lsum > 0, b_lsum, 1.0)
    tl.store(O + i_bh * DV + o_v, b_o.to(O.dtype.element_ty), mask=m_v)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _config(device: torch.device, span: int, programs: int, bd: int):
    """(BS keys a block, SPLIT keys a split program)."""
    if triton_interpreting():
        return 16, 32  # several blocks and splits even at tiny S
    BS = max(16, min(128, 8192 // bd))
    # enough programs to fill the GPU about 4 times, with at least 4 blocks of keys a split
    target = max(1, triton.cdiv(4 * _num_sms(device), programs))
    return BS, max(4 * BS, triton.cdiv(triton.cdiv(span, target), BS) * BS)


def attn_decoding_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window_size: Optional[int],
                      seq_start: Optional[torch.Tensor]) -> torch.Tensor:
    """q [B, 1, HQ, K], k [B, S, H, K], v [B, S, H, V] -> o [B, 1, HQ, V] in q.dtype."""
    B, _, HQ, DK = q.shape
    S, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    q = q.contiguous()
    if k.stride(-1) != 1 or k.stride(-2) != DK:
        k = k.contiguous()
    if v.stride(-1) != 1 or v.stride(-2) != DV:
        v = v.contiguous()
    o = torch.empty((B, 1, HQ, DV), device=q.device, dtype=q.dtype)
    if B == 0 or HQ == 0:
        return o
    if S == 0:
        return o.zero_()
    BK, BV = triton.next_power_of_2(DK), triton.next_power_of_2(DV)
    span = S if window_size is None else min(S, window_size)  # the cache positions any row can see
    base = S - span
    BS, split = _config(q.device, span, B * HQ, max(BK, BV))
    NS = triton.cdiv(span, split)
    m_ws = torch.empty((B * HQ, NS), device=q.device, dtype=torch.float32)
    l_ws = torch.empty((B * HQ, NS), device=q.device, dtype=torch.float32)
    acc_ws = torch.empty((B * HQ, NS, DV), device=q.device, dtype=torch.float32)
    start = seq_start.to(torch.int32).contiguous() if seq_start is not None else None
    _attn_decoding_split_kernel[(B * HQ, NS)](
        q, k, v, m_ws, l_ws, acc_ws, start, scale, S, base, split, NS, window_size or 1,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HQ=HQ, H=H, G=HQ // H, DK=DK, DV=DV, BS=BS, BK=BK, BV=BV,
        HAS_START=seq_start is not None, USE_WINDOW=window_size is not None, num_warps=4,
    )
    _attn_decoding_combine_kernel[(B * HQ,)](
        m_ws, l_ws, acc_ws, o, NS, DV=DV, BNS=max(2, triton.next_power_of_2(NS)), BV=BV, num_warps=4)
    return o
