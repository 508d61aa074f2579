"""Triton kernel of one LTE decoding step (``fla.ops.lte.decoding.lte_decoding_one_step``), split-K as in
flash-decoding.

The S cache slots are cut into NS splits of SPLIT slots:

1. ``_lte_decoding_split_kernel``, one program per (row, kv head, split): the G query heads of that kv head form a
   [BG >= 16, D] tile, so each key and value block is loaded once for all of them and both products are ``tl.dot``s
   (query rows beyond G are zeros, never stored). Slots with ``valid`` False are masked loads and -inf logits.
   Online softmax in float32 (base 2); the partial (max m, sum l, unnormalised acc [V]) of each query head goes to
   a workspace.
2. ``fla.ops.attn.decoding_kernels._attn_decoding_combine_kernel``, one program per (row, query head): merges the
   NS partials with log-sum-exp; a head with no valid slot anywhere gets zeros.

float32 inputs use IEEE dot products (no TF32), so the fp32 path matches the reference to about 1e-6.
q [B, 1, HQ, D]; k_cache [B, S, H, D], v_cache [B, S, H, V] (any strides but unit feature stride);
valid [B, S, H] bool (passed as a uint8 view). Grid sizes depend on shapes only: no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla.ops.attn.decoding_kernels import _attn_decoding_combine_kernel, _config


@triton.jit
def _lte_decoding_split_kernel(
    Q, K, Vp, VALID, M_ws, L_ws, ACC_ws, scale, S, SPLIT, NS,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_mb, stride_ms, stride_mh,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BG: tl.constexpr, IEEE: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_sp = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    o_g = tl.arange(0, BG)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_g = o_g < G
    m_k = o_k < DK
    m_v = o_v < DV
    i_hq0 = i_b * HQ + i_h * G  # first query head of this kv head (row-major over [B, HQ])

    b_q = tl.load(Q + (i_hq0 + o_g[:, None]) * DK + o_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634
    lo = i_sp * SPLIT
    hi = tl.minimum(lo + SPLIT, S)

    b_m = tl.full([BG], -1e30, dtype=tl.float32)  # finite start: a fully masked block gives no inf - inf
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BV], dtype=tl.float32)
    p_k0 = K + i_b * stride_kb + i_h * stride_kh
    p_v0 = Vp + i_b * stride_vb + i_h * stride_vh
    p_m0 = VALID + i_b * stride_mb + i_h * stride_mh
    for start in range(lo, hi, BS):
        o_s = start + tl.arange(0, BS)
        b_ok = tl.load(p_m0 + o_s.to(tl.int64) * stride_ms, mask=o_s < hi, other=0) != 0
        # keys loaded transposed, [BK, BS]: no tl.trans
        b_kt = tl.load(p_k0 + o_s[None, :].to(tl.int64) * stride_ks + o_k[:, None],
                       mask=m_k[:, None] & b_ok[None, :], other=0.0)
        if IEEE:
            b_s = tl.dot(b_q, b_kt, input_precision="ieee")
        else:
            b_s = tl.dot(b_q, b_kt)
        b_s = tl.where(b_ok[None, :], b_s * qk_scale, float("-inf"))
        b_mnew = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mnew[:, None])
        b_alpha = tl.exp2(b_m - b_mnew)
        b_v = tl.load(p_v0 + o_s[:, None].to(tl.int64) * stride_vs + o_v[None, :],
                      mask=b_ok[:, None] & m_v[None, :], other=0.0)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if IEEE:
            b_pv = tl.dot(b_p, b_v, input_precision="ieee")
        else:
            b_pv = tl.dot(b_p.to(b_v.dtype), b_v)
        b_acc = b_acc * b_alpha[:, None] + b_pv
        b_m = b_mnew

    i_ws = (i_hq0 + o_g) * NS + i_sp
    tl.store(M_ws + i_ws, b_m, mask=m_g)
    tl.store(L_ws + i_ws, b_l, mask=m_g)
    tl.store(ACC_ws + i_ws[:, None] * DV + o_v[None, :], b_acc, mask=m_g[:, None] & m_v[None, :])


def lte_decoding_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [B, 1, HQ, D], k_cache [B, S, H, D], v_cache [B, S, H, V], valid [B, S, H] -> o [B, 1, HQ, V]."""
    B, _, HQ, DK = q.shape
    S, H, DV = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    o = torch.empty((B, 1, HQ, DV), device=q.device, dtype=q.dtype)
    if B == 0 or HQ == 0 or DV == 0:
        return o
    if S == 0:
        return o.zero_()
    G = HQ // H
    BK, BV = max(16, triton.next_power_of_2(DK)), max(16, triton.next_power_of_2(DV))
    BG = max(16, triton.next_power_of_2(G))
    BS, split = _config(q.device, S, B * H, max(BK, BV))
    NS = triton.cdiv(S, split)
    m_ws = torch.empty((B * HQ, NS), device=q.device, dtype=torch.float32)
    l_ws = torch.empty((B * HQ, NS), device=q.device, dtype=torch.float32)
    acc_ws = torch.empty((B * HQ, NS, DV), device=q.device, dtype=torch.float32)
    _lte_decoding_split_kernel[(B * H, NS)](
        q, k_cache, v_cache, valid.view(torch.uint8), m_ws, l_ws, acc_ws, scale, S, split, NS,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), valid.stride(0), valid.stride(1), valid.stride(2),
        HQ=HQ, H=H, G=G, DK=DK, DV=DV, BS=BS, BK=BK, BV=BV, BG=BG, IEEE=q.dtype == torch.float32, num_warps=4,
    )
    _attn_decoding_combine_kernel[(B * HQ,)](
        m_ws, l_ws, acc_ws, o, NS, DV=DV, BNS=max(2, triton.next_power_of_2(NS)), BV=BV, num_warps=4)
    return o
