"""Backward of the WY representation (``wy_fwd.py``) of one chunk of the gated delta rule.

Per chunk and head, with X = Ai = (I + A)^{-1}, Kb = beta exp(g) * K, Vb = beta * V, W = X Kb, U = X Vb, given
dW = -dv_new h^T and dU = dv_new (from ``chunk_o.py`` / ``chunk_h.py``), and dX = dW Kb^T + dU Vb^T:

    dKb  = X^T dW                             dVb  = X^T dU
    dA   = -X^T dX X^T  on r > s,   where  X^T dX = dKb Kb^T + dVb Vb^T
    dA^T = -X dX^T X,               where  X dX^T = W dW^T + U dU^T
    G    = dA * E   (E[r, s] = exp(g_r - g_s)),  A = beta_r E (K K^T)

    dk     = dk_in + beta exp(g) * dKb + beta * (G K) + G^T (beta * K)
    dv     = beta * dVb
    dbeta  = exp(g) rowsum(dKb * K) + rowsum(dVb * V) + rowsum(G * K K^T)
    dg~    = dg~_in + beta exp(g) rowsum(dKb * K) + rowsum(G * beta K K^T) - colsum(G * beta K K^T)

(dk_in and dg~_in come from ``chunk_bwd_dqkwg``; dg~ is w.r.t. the cumulative g.) The two forms of X dX and its
transpose let every product take a dot result only as its LEFT operand and read every other operand from memory in
the orientation it needs: no tl.trans of a dot result feeds another dot (the pattern Triton 3.4 - 3.7.0 miscompiles
on Hopper, FLA #640), and G^T is computed, not transposed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla.ops.gated_delta_rule.chunk_common import Chunking, block_k, chunk_launch, chunk_span, dot_precision


@triton.jit
def _wy_bwd_kernel(K, V, G, BETA, AI, W, U, DW, DU, DK_IN, DG_IN, DK, DV, DBETA, DG, chunk_indices, cu_seqlens, T,
                   H: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    start, n_valid = chunk_span(i_c, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    m_t = o_t < n_valid
    rows = (start + o_t) * H + i_h
    DT = K.dtype.element_ty

    b = tl.load(BETA + rows, mask=m_t, other=0.0).to(tl.float32)
    g = tl.load(G + rows, mask=m_t, other=0.0)
    eg = tl.where(m_t, tl.exp(g), 0.0)
    bg = b * eg
    m_tt = m_t[:, None] & m_t[None, :]
    x_t = tl.load(AI + rows[None, :] * BT + o_t[:, None], mask=m_tt, other=0.0)  # X^T

    # pass 1: X^T dX, X dX^T and K K^T over K slabs; dV (and X^T dX, X dX^T) over V slabs
    xdx = tl.zeros([BT, BT], dtype=tl.float32)
    xdx_t = tl.zeros([BT, BT], dtype=tl.float32)
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(D_K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < D_K
        m_tk = m_t[:, None] & m_k[None, :]
        m_kt = m_k[:, None] & m_t[None, :]
        k = tl.load(K + rows[:, None] * D_K + o_k[None, :], mask=m_tk, other=0.0)
        k_t = tl.load(K + rows[None, :] * D_K + o_k[:, None], mask=m_kt, other=0.0)
        w = tl.load(W + rows[:, None] * D_K + o_k[None, :], mask=m_tk, other=0.0)
        dw = tl.load(DW + rows[:, None] * D_K + o_k[None, :], mask=m_tk, other=0.0).to(DT)
        dw_t = tl.load(DW + rows[None, :] * D_K + o_k[:, None], mask=m_kt, other=0.0).to(DT)
        kb_t = (k_t.to(tl.float32) * bg[None, :]).to(DT)
        dkb = tl.dot(x_t, dw, input_precision=PREC)
        xdx += tl.dot(dkb.to(DT), kb_t, input_precision=PREC)
        xdx_t += tl.dot(w, dw_t, input_precision=PREC)
        kk += tl.dot(k, k_t, input_precision=PREC)
    dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(D_V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < D_V
        m_tv = m_t[:, None] & m_v[None, :]
        m_vt = m_v[:, None] & m_t[None, :]
        v = tl.load(V + rows[:, None] * D_V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        v_t = tl.load(V + rows[None, :] * D_V + o_v[:, None], mask=m_vt, other=0.0)
        u = tl.load(U + rows[:, None] * D_V + o_v[None, :], mask=m_tv, other=0.0)
        du = tl.load(DU + rows[:, None] * D_V + o_v[None, :], mask=m_tv, other=0.0).to(DT)
        du_t = tl.load(DU + rows[None, :] * D_V + o_v[:, None], mask=m_vt, other=0.0).to(DT)
        vb_t = (v_t.to(tl.float32) * b[None, :]).to(DT)
        dvb = tl.dot(x_t, du, input_precision=PREC)
        xdx += tl.dot(dvb.to(DT), vb_t, input_precision=PREC)
        xdx_t += tl.dot(u, du_t, input_precision=PREC)
        tl.store(DV + rows[:, None] * D_V + o_v[None, :], (dvb * b[:, None]).to(DV.dtype.element_ty), mask=m_tv)
        dbeta += tl.sum(dvb * v, axis=1)

    # dA = -(X^T dX) X^T and dA^T = -(X dX^T) X, restricted to the strictly lower (upper for dA^T) part, times E
    x = tl.load(AI + rows[:, None] * BT + o_t[None, :], mask=m_tt, other=0.0)
    da = -tl.dot(xdx.to(DT), x_t, input_precision=PREC)
    da_t = -tl.dot(xdx_t.to(DT), x, input_precision=PREC)
    lower = (o_t[:, None] > o_t[None, :]) & m_tt
    upper = (o_t[:, None] < o_t[None, :]) & m_tt
    gm = tl.where(lower, da * tl.exp(tl.where(lower, g[:, None] - g[None, :], 0.0)), 0.0)
    gm_t = tl.where(upper, da_t * tl.exp(tl.where(upper, g[None, :] - g[:, None], 0.0)), 0.0)
    gkk = gm * kk
    dbeta += tl.sum(gkk, axis=1)
    gkk = gkk * b[:, None]  # = dA * A
    dg = tl.sum(gkk, axis=1) - tl.sum(gkk, axis=0)
    gm = gm.to(DT)
    gm_t = gm_t.to(DT)

    # pass 2: dK slab by slab
    dkbk = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(D_K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < D_K)[None, :]
        off = rows[:, None] * D_K + o_k[None, :]
        k = tl.load(K + off, mask=m_tk, other=0.0)
        dw = tl.load(DW + off, mask=m_tk, other=0.0).to(DT)
        kf = k.to(tl.float32)
        dkb = tl.dot(x_t, dw, input_precision=PREC)
        dk = tl.load(DK_IN + off, mask=m_tk, other=0.0).to(tl.float32) + dkb * bg[:, None]
        dk += tl.dot(gm, k.to(DT), input_precision=PREC) * b[:, None]
        dk += tl.dot(gm_t, (kf * b[:, None]).to(DT), input_precision=PREC)
        tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=m_tk)
        dkbk += tl.sum(dkb * kf, axis=1)
    dbeta += eg * dkbk
    dg += bg * dkbk + tl.load(DG_IN + rows, mask=m_t, other=0.0)
    tl.store(DBETA + rows, dbeta, mask=m_t)
    tl.store(DG + rows, dg, mask=m_t)


def wy_bwd(k, v, g, beta, ai, w, u, dw, du, dk_in, dg_in, chunking: Chunking):
    """Gradients through the WY representation.

    k, w, dw: [B, T, H, K]; v, u, du: [B, T, H, V]; g: [B, T, H] float32 (cumulative); beta: [B, T, H];
    ai: [B, T, H, 64]; dk_in: [B, T, H, K] float32; dg_in: [B, T, H] float32.
    Returns (dk [B, T, H, K] in k.dtype, dv [B, T, H, V] in v.dtype, dbeta [B, T, H] float32,
    dg~ [B, T, H] float32 w.r.t. the cumulative g).
    """
    B, T, H, D_K = k.shape
    D_V = v.shape[-1]
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbeta = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    dg = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    if chunking.num_chunks == 0:
        return dk, dv, dbeta, dg
    block, launch = chunk_launch("wy_bwd", k.dtype)
    _wy_bwd_kernel[(chunking.num_chunks, H)](
        k, v, g, beta, ai, w, u, dw, du, dk_in, dg_in, dk, dv, dbeta, dg, chunking.chunk_indices, chunking.cu_seqlens,
        T, H=H, D_K=D_K, D_V=D_V, BT=chunking.chunk_size, BK=block_k(D_K, block), BV=block_k(D_V, block),
        IS_VARLEN=chunking.is_varlen, PREC=dot_precision(k.dtype), **launch,
    )
    return dk, dv, dbeta, dg
