"""Per-chunk output of the gated delta rule and the per-chunk parts of its backward.

Per chunk and head, with chunk-start state h [K, V], pseudo-values v_new [BT, V] (``chunk_h.py``), g the
within-chunk cumulative log-decay, M the inclusive lower-triangular mask and E[r, s] = exp(g_r - g_s):

    O = scale * ( (Q * exp(g)) h + (M * E * Q K^T) v_new )                                  ``chunk_fwd_o``

Backward, with dO, the chunk's end-state gradient dh' (``chunk_bwd_dhu``) and the total gradient dv_new of v_new:

    dv_local = scale * (M * E * Q K^T)^T dO                                                 ``chunk_bwd_dv_local``
    dP       = M * E * scale * (dO v_new^T)                                  [BT, BT]
    dQ       = scale * exp(g) * (dO h^T) + dP K                                              ``chunk_bwd_dqkwg``
    dK       = dP^T Q + exp(g_L - g) * (v_new dh'^T)       (the WY part is added in ``wy_bwd.py``)
    dW       = -dv_new h^T
    dg~      = rowsum(Q * dQ) - rowsum(K * dK) + [r = L] (exp(g_L) <h, dh'> + sum_s k_s . dK_h'[s])

where dg~ is the gradient w.r.t. the cumulative g (before the reverse cumsum), L is the last valid row and dK_h' is
the second term of dK. Every product is a tl.dot of operands loaded from memory in the orientation it needs (e.g.
K^T, v_new^T and h^T are read transposed) and a dot result is only ever the LEFT operand of a later dot: no tl.trans
of a dot result feeds another dot (Hopper miscompile, FLA #640). dP^T is computed as its own product v_new dO^T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla.ops.gated_delta_rule.chunk_common import Chunking, block_k, chunk_launch, chunk_span, dot_precision


@triton.jit
def _fwd_o_kernel(Q, K, V_NEW, HS, G, O, chunk_indices, cu_seqlens, scale, T, H: tl.constexpr, D_K: tl.constexpr,
                  D_V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr,
                  PREC: tl.constexpr):
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, n_valid = chunk_span(i_c, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    m_t = o_t < n_valid
    rows = (start + o_t) * H + i_h
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < D_V
    state = (i_c.to(tl.int64) * H + i_h) * D_K * D_V
    DT = K.dtype.element_ty

    qh = tl.zeros([BT, BV], dtype=tl.float32)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(D_K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < D_K
        q = tl.load(Q + rows[:, None] * D_K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        k_t = tl.load(K + rows[None, :] * D_K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        h = tl.load(HS + state + o_k[:, None] * D_V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        qh += tl.dot(q, h, input_precision=PREC)
        qk += tl.dot(q, k_t, input_precision=PREC)
    g = tl.load(G + rows, mask=m_t, other=0.0)
    mask = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    qk = tl.where(mask, qk * tl.exp(tl.where(mask, g[:, None] - g[None, :], 0.0)), 0.0)
    v_new = tl.load(V_NEW + rows[:, None] * D_V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    o = qh * tl.exp(g)[:, None] + tl.dot(qk.to(DT), v_new, input_precision=PREC)
    tl.store(O + rows[:, None] * D_V + o_v[None, :], (o * scale).to(O.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _bwd_dv_local_kernel(Q, K, G, DO, DV, chunk_indices, cu_seqlens, scale, T, H: tl.constexpr, D_K: tl.constexpr,
                         D_V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start, n_valid = chunk_span(i_c, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    m_t = o_t < n_valid
    rows = (start + o_t) * H + i_h
    DT = K.dtype.element_ty

    # kq[s, r] = k_s . q_r, i.e. (Q K^T)^T computed directly as K Q^T
    kq = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(D_K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < D_K
        k = tl.load(K + rows[:, None] * D_K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        q_t = tl.load(Q + rows[None, :] * D_K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        kq += tl.dot(k, q_t, input_precision=PREC)
    g = tl.load(G + rows, mask=m_t, other=0.0)
    mask = (o_t[:, None] <= o_t[None, :]) & m_t[:, None] & m_t[None, :]  # s <= r
    kq = tl.where(mask, kq * (scale * tl.exp(tl.where(mask, g[None, :] - g[:, None], 0.0))), 0.0).to(DT)
    for i_v in range(tl.cdiv(D_V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < D_V)[None, :]
        do = tl.load(DO + rows[:, None] * D_V + o_v[None, :], mask=m, other=0.0)
        dv = tl.dot(kq, do.to(DT), input_precision=PREC)
        tl.store(DV + rows[:, None] * D_V + o_v[None, :], dv.to(DV.dtype.element_ty), mask=m)


@triton.jit
def _bwd_dqkwg_kernel(Q, K, V_NEW, HS, G, DO, DHS, DV_NEW, DQ, DK, DW, DG, chunk_indices, cu_seqlens, scale, T,
                      TOTAL_ROWS, H: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    # one program per (chunk, K slab, head): every result is a [BT, BK] slab or, for dg, a partial sum over this
    # K slab (the host adds the slabs)
    i_c, i_k, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, n_valid = chunk_span(i_c, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    m_t = o_t < n_valid
    rows = (start + o_t) * H + i_h
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < D_K
    m_tk = m_t[:, None] & m_k[None, :]
    state = (i_c.to(tl.int64) * H + i_h) * D_K * D_V
    DT = K.dtype.element_ty

    dp = tl.zeros([BT, BT], dtype=tl.float32)      # dO v_new^T     [r, s]
    dp_t = tl.zeros([BT, BT], dtype=tl.float32)    # v_new dO^T     [s, r]  (its transpose, computed directly)
    dq = tl.zeros([BT, BK], dtype=tl.float32)      # dO h^T
    dk = tl.zeros([BT, BK], dtype=tl.float32)      # v_new dh'^T
    dw = tl.zeros([BT, BK], dtype=tl.float32)      # dv_new h^T
    h_dh = tl.zeros([BK], dtype=tl.float32)        # <h, dh'> per key row
    for i_v in range(tl.cdiv(D_V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < D_V
        m_tv = m_t[:, None] & m_v[None, :]
        m_vt = m_v[:, None] & m_t[None, :]
        m_vk = m_v[:, None] & m_k[None, :]
        do = tl.load(DO + rows[:, None] * D_V + o_v[None, :], mask=m_tv, other=0.0).to(DT)
        do_t = tl.load(DO + rows[None, :] * D_V + o_v[:, None], mask=m_vt, other=0.0).to(DT)
        vn = tl.load(V_NEW + rows[:, None] * D_V + o_v[None, :], mask=m_tv, other=0.0)
        vn_t = tl.load(V_NEW + rows[None, :] * D_V + o_v[:, None], mask=m_vt, other=0.0)
        dvn = tl.load(DV_NEW + rows[:, None] * D_V + o_v[None, :], mask=m_tv, other=0.0)
        h_t = tl.load(HS + state + o_k[None, :] * D_V + o_v[:, None], mask=m_vk, other=0.0)
        dh_t = tl.load(DHS + state + o_k[None, :] * D_V + o_v[:, None], mask=m_vk, other=0.0)
        dp += tl.dot(do, vn_t, input_precision=PREC)
        dp_t += tl.dot(vn, do_t, input_precision=PREC)
        dq += tl.dot(do, h_t, input_precision=PREC)
        dk += tl.dot(vn, dh_t, input_precision=PREC)
        dw += tl.dot(dvn, h_t, input_precision=PREC)
        h_dh += tl.sum(h_t.to(tl.float32) * dh_t.to(tl.float32), axis=0)

    g = tl.load(G + rows, mask=m_t, other=0.0)
    g_last = tl.load(G + (start + n_valid - 1) * H + i_h)
    m_tt = m_t[:, None] & m_t[None, :]
    causal = (o_t[:, None] >= o_t[None, :]) & m_tt        # [r, s]: s <= r
    causal_t = (o_t[:, None] <= o_t[None, :]) & m_tt      # [s, r]: s <= r
    dp = tl.where(causal, dp * (scale * tl.exp(tl.where(causal, g[:, None] - g[None, :], 0.0))), 0.0).to(DT)
    dp_t = tl.where(causal_t, dp_t * (scale * tl.exp(tl.where(causal_t, g[None, :] - g[:, None], 0.0))), 0.0).to(DT)

    q = tl.load(Q + rows[:, None] * D_K + o_k[None, :], mask=m_tk, other=0.0)
    k = tl.load(K + rows[:, None] * D_K + o_k[None, :], mask=m_tk, other=0.0)
    dq = dq * (scale * tl.exp(g))[:, None] + tl.dot(dp, k, input_precision=PREC)
    dk = dk * tl.where(m_t, tl.exp(g_last - g), 0.0)[:, None]        # end-state term
    dk_all = dk + tl.dot(dp_t, q, input_precision=PREC)              # + dP^T Q

    tl.store(DQ + rows[:, None] * D_K + o_k[None, :], dq.to(DQ.dtype.element_ty), mask=m_tk)
    tl.store(DK + rows[:, None] * D_K + o_k[None, :], dk_all.to(DK.dtype.element_ty), mask=m_tk)
    tl.store(DW + rows[:, None] * D_K + o_k[None, :], (-dw).to(DW.dtype.element_ty), mask=m_tk)

    kf = k.to(tl.float32)
    dg = tl.sum(q.to(tl.float32) * dq, axis=1) - tl.sum(kf * dk_all, axis=1)
    last = tl.exp(g_last) * tl.sum(h_dh, axis=0) + tl.sum(tl.sum(kf * dk, axis=1), axis=0)
    dg = tl.where(o_t == n_valid - 1, dg + last, dg)
    tl.store(DG + i_k * TOTAL_ROWS + rows, dg, mask=m_t)


def chunk_fwd_o(q, k, v_new, h, g, scale: float, chunking: Chunking, output_dtype: torch.dtype) -> torch.Tensor:
    """O [B, T, H, V] in ``output_dtype``: q, k [B, T, H, K]; v_new [B, T, H, V]; h [num_chunks, H, K, V]; g float32."""
    B, T, H, D_K = q.shape
    D_V = v_new.shape[-1]
    o = torch.empty(B, T, H, D_V, device=q.device, dtype=output_dtype)
    if chunking.num_chunks == 0:
        return o
    block, launch = chunk_launch("fwd_o", k.dtype)
    BV = block_k(D_V, block)
    _fwd_o_kernel[(chunking.num_chunks, triton.cdiv(D_V, BV), H)](
        q, k, v_new, h, g, o, chunking.chunk_indices, chunking.cu_seqlens, float(scale), T, H=H, D_K=D_K, D_V=D_V,
        BT=chunking.chunk_size, BK=block_k(D_K, block), BV=BV, IS_VARLEN=chunking.is_varlen,
        PREC=dot_precision(k.dtype), **launch,
    )
    return o


def chunk_bwd_dv_local(q, k, g, do, scale: float, chunking: Chunking) -> torch.Tensor:
    """scale * (tril_incl(Q K^T * exp(g_r - g_s)))^T dO, [B, T, H, V] in k.dtype."""
    B, T, H, D_K = k.shape
    D_V = do.shape[-1]
    dv = torch.empty_like(do, dtype=k.dtype)
    if chunking.num_chunks == 0:
        return dv
    block, launch = chunk_launch("dv_local", k.dtype)
    _bwd_dv_local_kernel[(chunking.num_chunks, H)](
        q, k, g, do, dv, chunking.chunk_indices, chunking.cu_seqlens, float(scale), T, H=H, D_K=D_K, D_V=D_V,
        BT=chunking.chunk_size, BK=block_k(D_K, block), BV=block_k(D_V, block), IS_VARLEN=chunking.is_varlen,
        PREC=dot_precision(k.dtype), **launch,
    )
    return dv


def chunk_bwd_dqkwg(q, k, v_new, h, g, do, dh, dv_new, scale: float, chunking: Chunking):
    """Per-chunk gradients (see the module docstring).

    Returns (dq [B, T, H, K] in q.dtype, dk [B, T, H, K] float32 (without the WY part), dw [B, T, H, K] in k.dtype,
    dg~ [B, T, H] float32 (gradient w.r.t. the cumulative g, without the WY part)).
    """
    B, T, H, D_K = k.shape
    D_V = do.shape[-1]
    block, launch = chunk_launch("dqkwg", k.dtype, max(D_K, D_V))
    BK = block_k(D_K, block)
    NK = triton.cdiv(D_K, BK)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k, dtype=torch.float32)
    dw = torch.empty_like(k)
    dg = g.new_empty(NK, B, T, H, dtype=torch.float32)
    if chunking.num_chunks == 0:
        return dq, dk, dw, dg.sum(0)
    _bwd_dqkwg_kernel[(chunking.num_chunks, NK, H)](
        q, k, v_new, h, g, do, dh, dv_new, dq, dk, dw, dg, chunking.chunk_indices, chunking.cu_seqlens, float(scale),
        T, B * T * H, H=H, D_K=D_K, D_V=D_V, BT=chunking.chunk_size, BK=BK, BV=block_k(D_V, block),
        IS_VARLEN=chunking.is_varlen, PREC=dot_precision(k.dtype), **launch,
    )
    return dq, dk, dw, dg.sum(0)
