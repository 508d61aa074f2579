"""``chunk_gated_delta_rule``: the chunked gated delta rule for training and prefill.

Recurrence per head (state S [K, V]):  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
o_t = scale * S_t^T q_t.

On CUDA (and with ``FLA_BACKEND=triton``) it runs the Triton kernels below; on the CPU the chunked torch path
(``fla.ops.gated_delta_rule.chunk_torch``). On an H200 (Triton 3.6) the kernels pass their GPU tests against the
float64 torch path, forward and every gradient, for bf16 (K = 64, 100, 128, 256; varlen; 16 heads), fp16 (K = 128)
and fp32 (K = 64, 128, 256; varlen; 16 heads). On an H100 (Triton 3.6) the state recurrences in segments
(``chunk_h.num_segments``) pass them for bf16 K = 128 and fp32 K = 64 (B1, 2 heads, T = 8K), with bf16 K = 64 /
128 / 256, 16 heads and varlen beside them; the bf16 launch settings tuned afterwards (``chunk_common``) gave each
stage's outputs within 2e-7 of the tested ones there.
The Triton path cuts every sequence into chunks of 64 tokens and uses the
WY / UT representation of each chunk:

    forward   g      = chunk-local cumsum of the log-decays                   fla/ops/utils/cumsum.py
              Ai     = (I + strict_tril(beta K K^T * exp(g_r - g_s)))^{-1}    wy_fwd.chunk_scaled_dot_kkt_solve
              W, U   = Ai (beta exp(g) K),  Ai (beta V)                        wy_fwd.recompute_w_u
              h, v_new, final state: the inter-chunk recurrence              chunk_h.chunk_fwd_h
                                     (in segments for long sequences with few heads)
              O      = scale ((Q exp(g)) h + tril(Q K^T * exp(g_r - g_s)) v_new)   chunk_o.chunk_fwd_o
    backward  (recomputes W, U, h, v_new from the saved q, k, v, g, beta, Ai)
              dv_local, then the reverse state recurrence (dh, dv_new, dh0)  chunk_o / chunk_h
              dq, dk, dw, dg (per chunk)                                     chunk_o.chunk_bwd_dqkwg
              dk, dv, dbeta, dg through the WY representation                wy_bwd.wy_bwd
              dg     = chunk-local reverse cumsum                            fla/ops/utils/cumsum.py

States and every accumulation are float32; products take q/k/v's dtype (bf16 / fp16 tensor cores; fp32 inputs use
exact fp32 products). ``use_qk_l2norm_in_kernel`` normalises q and k with ``fla.ops.utils.l2norm`` (differentiable)
before the op.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fla.ops.gated_delta_rule.chunk_common import make_chunking
from fla.ops.gated_delta_rule.chunk_h import chunk_bwd_dhu, chunk_fwd_h
from fla.ops.gated_delta_rule.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local, chunk_fwd_o
from fla.ops.gated_delta_rule.chunk_torch import chunk_gated_delta_rule_torch
from fla.ops.gated_delta_rule.common import check_gdn_inputs
from fla.ops.gated_delta_rule.wy_bwd import wy_bwd
from fla.ops.gated_delta_rule.wy_fwd import chunk_scaled_dot_kkt_solve, recompute_w_u
from fla.ops.utils.cumsum import chunk_local_cumsum
from fla.ops.utils.l2norm import l2norm
from fla.utils import autocast_custom_bwd, autocast_custom_fwd, use_triton


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, chunking):
    """Triton forward on contiguous inputs of one compute dtype. Returns (o, final_state, g_cumsum, Ai)."""
    g = chunk_local_cumsum(g, chunking.chunk_size, cu_seqlens=chunking.cu_seqlens,
                           chunk_indices=chunking.chunk_indices)
    ai = chunk_scaled_dot_kkt_solve(k, g, beta, chunking)
    w, u = recompute_w_u(k, v, g, beta, ai, chunking)
    h, v_new, final_state = chunk_fwd_h(k, w, u, g, initial_state, output_final_state, chunking)
    o = chunk_fwd_o(q, k, v_new, h, g, scale, chunking, output_dtype=v.dtype)
    return o, final_state, g, ai


def chunk_gated_delta_rule_bwd(q, k, v, g, beta, ai, scale, initial_state, do, dht, need_dh0, chunking):
    """Triton backward. g is the chunk-local cumsum saved by the forward. Returns (dq, dk, dv, dg, dbeta, dh0);
    dg, dbeta and dh0 (None unless ``need_dh0``) in float32."""
    w, u = recompute_w_u(k, v, g, beta, ai, chunking)
    h, v_new, _ = chunk_fwd_h(k, w, u, g, initial_state, False, chunking)
    dv_local = chunk_bwd_dv_local(q, k, g, do, scale, chunking)
    dh, dv_new, dh0 = chunk_bwd_dhu(q, k, w, g, do, dv_local, dht, need_dh0, scale, chunking)
    dq, dk_qo, dw, dg_qo = chunk_bwd_dqkwg(q, k, v_new, h, g, do, dh, dv_new, scale, chunking)
    dk, dv, dbeta, dg_cum = wy_bwd(k, v, g, beta, ai, w, u, dw, dv_new, dk_qo, dg_qo, chunking)
    dg = chunk_local_cumsum(dg_cum, chunking.chunk_size, reverse=True, cu_seqlens=chunking.cu_seqlens,
                            chunk_indices=chunking.chunk_indices)
    return dq, dk, dv, dg, dbeta, dh0


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
        if initial_state is not None:
            initial_state = initial_state.contiguous()
        chunking = make_chunking(q.shape[0], q.shape[1], cu_seqlens)
        o, final_state, g_cum, ai = chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state,
                                                               output_final_state, chunking)
        ctx.save_for_backward(q, k, v, g_cum, beta, ai, initial_state)
        ctx.chunking, ctx.scale = chunking, scale
        ctx.g_dtype = g.dtype
        return o, final_state

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, do, dht):
        q, k, v, g_cum, beta, ai, initial_state = ctx.saved_tensors
        do = do.to(v.dtype).contiguous()
        dht = dht.contiguous() if dht is not None else None
        need_dh0 = initial_state is not None and ctx.needs_input_grad[6]
        dq, dk, dv, dg, dbeta, dh0 = chunk_gated_delta_rule_bwd(q, k, v, g_cum, beta, ai, ctx.scale, initial_state,
                                                                do, dht, need_dh0, ctx.chunking)
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dv, dg.to(ctx.g_dtype), dbeta.to(beta.dtype), None, dh0, None, None


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated delta rule over whole sequences; see ``fla.ops.gated_delta_rule.naive`` for the recurrence.

    Args:
        q, k: [B, T, H, K] (K <= 256 on the Triton path). v: [B, T, H, V].
        g (log decay, <= 0): [B, T, H], any float dtype (used in float32). beta: [B, T, H].
        scale: output scale, default K ** -0.5.
        initial_state: [N, H, K, V] or None. output_final_state: return the final states [N, H, K, V] (float32).
        use_qk_l2norm_in_kernel: L2-normalise q and k over K inside the op (x / sqrt(sum x^2 + 1e-6)).
        cu_seqlens: [N + 1] offsets of packed sequences (B = 1); each sequence has its own initial / final state.

    Returns:
        (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] float32 or None)

    Gradients flow to q, k, v, g, beta and initial_state. q, k and v of different dtypes are computed in their
    promoted dtype.
    """
    check_gdn_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if not use_triton(q):
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)

    if q.shape[-1] > 256:
        raise ValueError(f"the Triton chunked gated delta rule supports head dimension K <= 256, got K={q.shape[-1]}")
    out_dtype = v.dtype
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    o, final_state = ChunkGatedDeltaRuleFunction.apply(q, k, v, g, beta, scale, initial_state,
                                                       bool(output_final_state), cu_seqlens)
    return o.to(out_dtype), (final_state if output_final_state else None)
