"""Inter-chunk state recurrence of the gated delta rule (forward) and its reverse (backward).

Per sequence and head, with chunk-start state h_n [K, V] (float32 in registers), g the within-chunk cumulative
log-decay, L the chunk's last valid row, and W, U from ``wy_fwd.py``:

    forward  (``chunk_fwd_h``)
        v_new   = U - W h_n                                          [BT, V]  pseudo-values of the chunk
        h_{n+1} = exp(g_L) h_n + K^T (exp(g_L - g) * v_new)

    backward (``chunk_bwd_dhu``), given dh_{n+1} = dL/dh_{n+1} (the final-state gradient for the last chunk) and
    dv_local = scale * (tril_incl(Q K^T * exp(g_r - g_s)))^T dO (``chunk_bwd_dv_local``):
        dv_new  = dv_local + exp(g_L - g) * (K dh_{n+1})             [BT, V]  total gradient of v_new
        dh_n    = exp(g_L) dh_{n+1} + scale * (Q * exp(g))^T dO - W^T dv_new

One program owns one [K, BV] column slab of one (sequence, head) state and walks its chunks in order; K (<= 256) is
held whole because v_new contracts over all of it. The slab is carried transposed ([BV, K]) so that it, and every
other dot result, is only ever the LEFT operand of a product; the other operands are read from memory in the
orientation they are needed (no tl.trans of a dot result feeds another dot: Hopper miscompile, FLA #640).

Stored per chunk: ``h[c]`` = state at the start of chunk c; ``dh[c]`` = gradient of the state at the END of chunk c
(what the chunk's own gradients need), both [num_chunks, H, K, V] in the compute dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fla.ops.gated_delta_rule.chunk_common import Chunking, dot_precision, num_stages, num_warps, sequence_span

MAX_HEAD_DIM_K = 256


def _state_launch(D_K: int, D_V: int, num_states: int, dtype: torch.dtype) -> Tuple[int, int, dict]:
    """(BK, BV, launch options). The whole K in one tile; the V slab narrower for large K (registers) and when there
    are few (sequence, head) states (more programs then walk their chunks in parallel: each step's latency is the
    cost). One pipeline stage at K = 256: three [64, 256] operand tiles per step already take about 100 KB of shared
    memory in bf16."""
    BK = max(16, triton.next_power_of_2(D_K))
    BV = 32 if BK > 128 or num_states * triton.cdiv(D_V, 64) < 128 else 64
    BV = max(16, min(triton.next_power_of_2(D_V), BV))
    stages = 1 if BK > 128 else num_stages(dtype)
    return BK, BV, {"num_warps": num_warps(dtype), "num_stages": stages}


@triton.jit
def _fwd_h_kernel(K, W, U, G, H_OUT, V_NEW, H0, HT, cu_seqlens, chunk_offsets, T, H: tl.constexpr,
                  D_K: tl.constexpr, D_V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    # the state is carried transposed, h^T [BV, BK], so that it is the LEFT operand of both products:
    #   v_new^T = U^T - h^T W^T,   h^T <- exp(g_L) h^T + (v_new^T * exp(g_L - g)) K
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, length, NT, first_chunk = sequence_span(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < D_K
    m_v = o_v < D_V
    m_vk = m_v[:, None] & m_k[None, :]
    state_off = o_k[None, :] * D_V + o_v[:, None]  # element [v, k] of a [K, V] state
    DT = K.dtype.element_ty

    h_t = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_H0:
        h_t += tl.load(H0 + i_nh.to(tl.int64) * D_K * D_V + state_off, mask=m_vk, other=0.0).to(tl.float32)
    for i_t in range(NT):
        start = bos + i_t * BT
        n_valid = tl.minimum(length - i_t * BT, BT)
        m_t = o_t < n_valid
        m_vt = m_v[:, None] & m_t[None, :]
        rows = (start + o_t) * H + i_h  # packed (token, head) row index
        tl.store(H_OUT + ((first_chunk + i_t) * H + i_h) * D_K * D_V + state_off, h_t.to(H_OUT.dtype.element_ty),
                 mask=m_vk)
        w_t = tl.load(W + rows[None, :] * D_K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        u_t = tl.load(U + rows[None, :] * D_V + o_v[:, None], mask=m_vt, other=0.0)
        v_new_t = u_t.to(tl.float32) - tl.dot(h_t.to(DT), w_t, input_precision=PREC)
        tl.store(V_NEW + rows[None, :] * D_V + o_v[:, None], v_new_t.to(V_NEW.dtype.element_ty), mask=m_vt)
        g = tl.load(G + rows, mask=m_t, other=0.0)
        g_last = tl.load(G + (start + n_valid - 1) * H + i_h)
        decay = tl.where(m_t, tl.exp(g_last - g), 0.0)
        k = tl.load(K + rows[:, None] * D_K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        h_t = h_t * tl.exp(g_last) + tl.dot((v_new_t * decay[None, :]).to(DT), k, input_precision=PREC)
    if STORE_HT:
        tl.store(HT + i_nh.to(tl.int64) * D_K * D_V + state_off, h_t, mask=m_vk)


@triton.jit
def _bwd_dhu_kernel(Q, K, W, G, DO, DV_LOCAL, DH_OUT, DV_NEW, DHT, DH0, cu_seqlens, chunk_offsets, scale, T,
                    H: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
                    PREC: tl.constexpr):
    # the gradient is carried transposed, dh^T [BV, BK], the LEFT operand of every product (as in _fwd_h_kernel):
    #   dv_new^T = dv_local^T + exp(g_L - g) * (dh^T K^T)
    #   dh^T <- exp(g_L) dh^T + dO^T (scale exp(g) * Q) - dv_new^T W
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, length, NT, first_chunk = sequence_span(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < D_K
    m_v = o_v < D_V
    m_vk = m_v[:, None] & m_k[None, :]
    state_off = o_k[None, :] * D_V + o_v[:, None]
    DT = K.dtype.element_ty

    dh_t = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_DHT:
        dh_t += tl.load(DHT + i_nh.to(tl.int64) * D_K * D_V + state_off, mask=m_vk, other=0.0).to(tl.float32)
    for j in range(NT):
        i_t = NT - 1 - j
        start = bos + i_t * BT
        n_valid = tl.minimum(length - i_t * BT, BT)
        m_t = o_t < n_valid
        m_vt = m_v[:, None] & m_t[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        rows = (start + o_t) * H + i_h
        tl.store(DH_OUT + ((first_chunk + i_t) * H + i_h) * D_K * D_V + state_off,
                 dh_t.to(DH_OUT.dtype.element_ty), mask=m_vk)
        g = tl.load(G + rows, mask=m_t, other=0.0)
        g_last = tl.load(G + (start + n_valid - 1) * H + i_h)
        decay = tl.where(m_t, tl.exp(g_last - g), 0.0)
        k_t = tl.load(K + rows[None, :] * D_K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        dv_t = tl.load(DV_LOCAL + rows[None, :] * D_V + o_v[:, None], mask=m_vt, other=0.0).to(tl.float32)
        dv_t += decay[None, :] * tl.dot(dh_t.to(DT), k_t, input_precision=PREC)
        tl.store(DV_NEW + rows[None, :] * D_V + o_v[:, None], dv_t.to(DV_NEW.dtype.element_ty), mask=m_vt)
        q = tl.load(Q + rows[:, None] * D_K + o_k[None, :], mask=m_tk, other=0.0)
        q = (q.to(tl.float32) * tl.where(m_t, scale * tl.exp(g), 0.0)[:, None]).to(DT)
        w = tl.load(W + rows[:, None] * D_K + o_k[None, :], mask=m_tk, other=0.0)
        do_t = tl.load(DO + rows[None, :] * D_V + o_v[:, None], mask=m_vt, other=0.0).to(DT)
        dh_t = dh_t * tl.exp(g_last) + tl.dot(do_t, q, input_precision=PREC) \
            - tl.dot(dv_t.to(DT), w, input_precision=PREC)
    if STORE_DH0:
        tl.store(DH0 + i_nh.to(tl.int64) * D_K * D_V + state_off, dh_t, mask=m_vk)


def _check_head_dim(D_K: int) -> None:
    if D_K > MAX_HEAD_DIM_K:
        raise ValueError(f"the chunked gated delta rule kernels hold the key dimension in registers: K={D_K} is too "
                         f"large (at most {MAX_HEAD_DIM_K})")


def chunk_fwd_h(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, g: torch.Tensor,
                initial_state: Optional[torch.Tensor], output_final_state: bool, chunking: Chunking):
    """Chunk-start states and pseudo-values.

    k, w: [B, T, H, K]; u: [B, T, H, V]; g: [B, T, H] float32 (within-chunk cumsum); initial_state: [N, H, K, V].
    Returns (h [num_chunks, H, K, V] in k.dtype, v_new [B, T, H, V] in k.dtype, final_state [N, H, K, V] float32
    or None).
    """
    B, T, H, D_K = k.shape
    D_V = u.shape[-1]
    _check_head_dim(D_K)
    N = chunking.N
    h = k.new_empty(chunking.num_chunks, H, D_K, D_V)
    v_new = torch.empty_like(u)
    final_state = k.new_empty(N, H, D_K, D_V, dtype=torch.float32) if output_final_state else None
    if N * H == 0:
        return h, v_new, final_state
    BK, BV, launch = _state_launch(D_K, D_V, N * H, k.dtype)
    _fwd_h_kernel[(N * H, triton.cdiv(D_V, BV))](
        k, w, u, g, h, v_new, initial_state, final_state, chunking.cu_seqlens, chunking.chunk_offsets, T, H=H,
        D_K=D_K, D_V=D_V, BT=chunking.chunk_size, BK=BK, BV=BV, USE_H0=initial_state is not None,
        STORE_HT=output_final_state, IS_VARLEN=chunking.is_varlen, PREC=dot_precision(k.dtype), **launch,
    )
    return h, v_new, final_state


def chunk_bwd_dhu(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, g: torch.Tensor, do: torch.Tensor,
                  dv_local: torch.Tensor, dht: Optional[torch.Tensor], need_dh0: bool, scale: float,
                  chunking: Chunking):
    """Reverse state recurrence.

    q, k, w: [B, T, H, K]; g: [B, T, H] float32; do, dv_local: [B, T, H, V]; dht: [N, H, K, V] or None.
    Returns (dh [num_chunks, H, K, V] (gradient of each chunk's end state) in k.dtype, dv_new [B, T, H, V] in
    k.dtype, dh0 [N, H, K, V] float32 or None).
    """
    B, T, H, D_K = k.shape
    D_V = do.shape[-1]
    _check_head_dim(D_K)
    N = chunking.N
    dh = k.new_empty(chunking.num_chunks, H, D_K, D_V)
    dv_new = torch.empty_like(do, dtype=k.dtype)
    dh0 = k.new_empty(N, H, D_K, D_V, dtype=torch.float32) if need_dh0 else None
    if N * H == 0:
        return dh, dv_new, dh0
    BK, BV, launch = _state_launch(D_K, D_V, N * H, k.dtype)
    _bwd_dhu_kernel[(N * H, triton.cdiv(D_V, BV))](
        q, k, w, g, do, dv_local, dh, dv_new, dht, dh0, chunking.cu_seqlens, chunking.chunk_offsets, float(scale), T,
        H=H, D_K=D_K, D_V=D_V, BT=chunking.chunk_size, BK=BK, BV=BV, USE_DHT=dht is not None, STORE_DH0=need_dh0,
        IS_VARLEN=chunking.is_varlen, PREC=dot_precision(k.dtype), **launch,
    )
    return dh, dv_new, dh0
