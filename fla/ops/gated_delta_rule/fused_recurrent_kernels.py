"""Triton kernel of ``fused_recurrent_gated_delta_rule`` (forward only): the decode / short-prefill recurrence.

One program per (sequence, head, block of BV value columns). It holds the [BK, BV] float32 tile of the state in
registers and steps over the sequence's tokens, per token (see ``naive.py``):

    S <- exp(g_t) S;   u = beta_t (v_t - S^T k_t);   S <- S + k_t u^T;   o_t = scale * S^T q_t

q and k are optionally L2-normalised first (x / sqrt(sum x^2 + 1e-6)); each value block recomputes that (K <= 256
numbers). Layouts: q, k [B, T, H, K]; v, o [B, T, H, V]; g, beta [B, T, H]; states [N, H, K, V]; all contiguous,
with B = 1 and ``cu_seqlens`` [N + 1] for packed sequences. Loads are upcast to float32; o is stored in its dtype,
the final state in float32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256


@triton.jit
def _fused_recurrent_gdn_fwd_kernel(
    Q, K_, V_, G, BETA, O, H0, HT, CU, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    USE_QK_L2NORM: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    if IS_VARLEN:
        bos = tl.load(CU + i_n).to(tl.int64)
        eos = tl.load(CU + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    state_off = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(H0 + state_off, mask=m_h, other=0.0).to(tl.float32)

    for t in range(bos, eos):
        row = t * H + i_h
        b_q = tl.load(Q + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(K_ + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(V_ + row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(G + row).to(tl.float32)
        b_beta = tl.load(BETA + row).to(tl.float32)
        if USE_QK_L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
        b_h *= tl.exp(b_g)
        b_u = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
        b_h += b_k[:, None] * b_u[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0) * scale
        tl.store(O + row * V + o_v, b_o.to(O.dtype.element_ty), mask=m_v)

    if STORE_FINAL_STATE:
        tl.store(HT + state_off, b_h, mask=m_h)


def _value_block(BK: int, V: int) -> int:
    # keep the state tile at <= 4096 float32 registers per program (32 per thread with 4 warps)
    return max(8, min(triton.next_power_of_2(V), 4096 // BK))


def fused_recurrent_gdn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
    cu_seqlens: Optional[torch.Tensor],
    num_sequences: int,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the kernel on validated inputs.

    Returns (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] float32 or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"the fused recurrent kernel supports head dims K, V <= {MAX_HEAD_DIM}, got K={K}, V={V}")
    N = num_sequences
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    o = torch.empty_like(v)
    final = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    BK = triton.next_power_of_2(K)
    BV = _value_block(BK, V)
    grid = (triton.cdiv(V, BV), N * H)
    if N * H > 0:
        _fused_recurrent_gdn_fwd_kernel[grid](
            q, k, v, g, beta, o, initial_state, final, cu_seqlens, float(scale), T,
            H=H, K=K, V=V, BK=BK, BV=BV,
            USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
            IS_VARLEN=cu_seqlens is not None, USE_QK_L2NORM=use_qk_l2norm_in_kernel,
            num_warps=4 if BK * BV >= 2048 else 2, num_stages=1,
        )
    return o, final
