"""Triton kernel of one LTE cache step (``fla.ops.lte.cache.lte_cache_step``), in place.

One program per (row b, kv head h):
1. read the outgoing ring slot ``slot[b]`` (score, sink, valid) and the b buffer priorities (a next_pow2(b) block,
   masked; +inf for sinks, -inf for empty slots, +inf on the padding lanes so they are never the argmin);
2. argmin (lowest index among equals, so empty slots first); the outgoing token moves iff it is valid, selected
   (sink or score > 0) and its priority is strictly above the minimum: copy its D-long key, V-long value, score and
   sink flag to that buffer slot, set valid (masked stores, no branch);
3. after a CTA barrier (the outgoing slot's reads, done by replicated threads, must precede its overwrite), write
   the new token into the ring slot: k, v, valid = new_valid, sink = new_sink & new_valid, score = -inf.

Cost per (b, h): 6 bytes x buffer_size read, about 2 (D + V) elements read and written. No host sync, no
data-dependent shape: capturable in a CUDA graph. Bool tensors are passed as uint8 views.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lte_cache_step_kernel(
    K, Vc, SCORE, SINK, VALID, SLOT, NEW_K, NEW_V, NEW_VALID, NEW_SINK,
    W1, NB,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_mb, stride_ms, stride_mh,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BB: tl.constexpr,
    HAS_BUFFER: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV
    slot = tl.load(SLOT + i_b).to(tl.int64)
    p_meta_out = i_b * stride_mb + slot * stride_ms + i_h * stride_mh
    p_k_out = K + i_b * stride_kb + slot * stride_ks + i_h * stride_kh
    p_v_out = Vc + i_b * stride_vb + slot * stride_vs + i_h * stride_vh

    if HAS_BUFFER:
        s_out = tl.load(SCORE + p_meta_out)
        sink_out = tl.load(SINK + p_meta_out) != 0
        valid_out = tl.load(VALID + p_meta_out) != 0
        prio_out = tl.where(sink_out, float("inf"), s_out)

        o_j = tl.arange(0, BB)
        m_j = o_j < NB
        p_meta_buf = i_b * stride_mb + (W1 + o_j).to(tl.int64) * stride_ms + i_h * stride_mh
        b_score = tl.load(SCORE + p_meta_buf, mask=m_j, other=0.0)
        b_sink = tl.load(SINK + p_meta_buf, mask=m_j, other=0) != 0
        b_valid = tl.load(VALID + p_meta_buf, mask=m_j, other=0) != 0
        b_prio = tl.where(b_valid, tl.where(b_sink, float("inf"), b_score), float("-inf"))
        b_prio = tl.where(m_j, b_prio, float("inf"))
        low = tl.min(b_prio, 0)
        j = tl.argmin(b_prio, 0)
        move = valid_out & (sink_out | (s_out > 0)) & (prio_out > low)

        t = (W1 + j).to(tl.int64)
        b_k = tl.load(p_k_out + o_k, mask=m_k, other=0.0)
        b_v = tl.load(p_v_out + o_v, mask=m_v, other=0.0)
        tl.store(K + i_b * stride_kb + t * stride_ks + i_h * stride_kh + o_k, b_k, mask=m_k & move)
        tl.store(Vc + i_b * stride_vb + t * stride_vs + i_h * stride_vh + o_v, b_v, mask=m_v & move)
        p_meta_t = i_b * stride_mb + t * stride_ms + i_h * stride_mh
        tl.store(SCORE + p_meta_t, s_out, mask=move)
        tl.store(SINK + p_meta_t, sink_out.to(tl.uint8), mask=move)
        tl.store(VALID + p_meta_t, tl.full([], 1, dtype=tl.uint8), mask=move)
        # every thread's reads of the outgoing slot happen before any thread overwrites it
        tl.debug_barrier()

    new_valid = tl.load(NEW_VALID + i_b) != 0
    new_sink = tl.load(NEW_SINK + i_b) != 0
    b_nk = tl.load(NEW_K + (i_b * H + i_h) * DK + o_k, mask=m_k, other=0.0)
    b_nv = tl.load(NEW_V + (i_b * H + i_h) * DV + o_v, mask=m_v, other=0.0)
    tl.store(p_k_out + o_k, b_nk, mask=m_k)
    tl.store(p_v_out + o_v, b_nv, mask=m_v)
    tl.store(SCORE + p_meta_out, float("-inf"))
    tl.store(SINK + p_meta_out, (new_sink & new_valid).to(tl.uint8))
    tl.store(VALID + p_meta_out, new_valid.to(tl.uint8))


def lte_cache_step_supported(k_cache, v_cache, score, sink, valid) -> bool:
    """The kernel needs unit-stride feature dims and one stride set shared by score, sink and valid."""
    return (k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and score.stride() == sink.stride() == valid.stride())


def lte_cache_step_fwd(k_cache, v_cache, score, sink, valid, slot, new_k, new_v, new_valid, new_sink,
                       window_size: int) -> None:
    B, S, H, DK = k_cache.shape
    DV = v_cache.shape[-1]
    W1 = window_size + 1
    NB = S - W1
    new_k = new_k.contiguous()
    new_v = new_v.contiguous()
    _lte_cache_step_kernel[(B, H)](
        k_cache, v_cache, score, sink.view(torch.uint8), valid.view(torch.uint8), slot.contiguous(), new_k, new_v,
        new_valid.contiguous().view(torch.uint8), new_sink.contiguous().view(torch.uint8),
        W1, NB,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), score.stride(0), score.stride(1), score.stride(2),
        H=H, DK=DK, DV=DV, BK=triton.next_power_of_2(max(DK, 1)), BV=triton.next_power_of_2(max(DV, 1)),
        BB=max(2, triton.next_power_of_2(max(NB, 1))), HAS_BUFFER=NB > 0, num_warps=2 if NB <= 1024 else 4,
    )
