"""NSA's Triton path as one autograd function: compressed branch, block selection, selected branch and the gated sum
of the three branches, with the window branch's output passed in.

Forward: mean pooling (torch), the compressed attention and the block ranking (``compression_kernels``), ``topk``,
then the selected attention, whose kernel also writes out = g_slc o_slc + g_cmp o_cmp + g_swa o_swa from the float32
o_slc (``parallel_kernels``). No branch output is converted to float32 or combined by torch.

Backward: one row kernel (``_gate_bwd_kernel`` below) reads dO and the three branch outputs once and writes the gates'
gradients, the branches' softmax deltas (delta_x = rowsum(g_x dO * o_x) = g_x dg_x) and the window branch's dO
(g_swa dO, which flows into the window attention's own backward). The compressed and selected backward kernels read dO
and scale each row by their gate on load; the selected dq kernel adds the compressed dq, and the selected dk/dv
kernel adds the mean-pooled blocks' gradients (dk_cmp / BS over each complete block's tokens).

Shapes: q [B, T_q, HQ, K], k [B, T_k, H, K], v [B, T_k, H, V], gates [B, T_q, HQ], o_swa [B, T_q, HQ, V] (any float
dtype); queries are the last T_q tokens.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fla.ops.nsa.compression import mean_pool_blocks
from fla.ops.nsa.compression_kernels import block_importance, cmp_bwd, cmp_fwd, top_blocks
from fla.ops.nsa.parallel_kernels import clean_block_indices, slc_bwd, slc_fwd


@triton.jit
def _gate_bwd_kernel(
    DO, OC, OS, OW, GC, GS, GW, DGC, DGS, DGW, DELC, DELS, DOW, R,
    DV: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, HAS_CMP: tl.constexpr, HAS_SWA: tl.constexpr,
):
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_v = tl.arange(0, BV)
    m_r = o_r < R
    m = m_r[:, None] & (o_v < DV)[None, :]
    off = o_r[:, None] * DV + o_v[None, :]
    b_do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    b_dg = tl.sum(b_do * tl.load(OS + off, mask=m, other=0.0).to(tl.float32), 1)
    tl.store(DGS + o_r, b_dg.to(DGS.dtype.element_ty), mask=m_r)
    tl.store(DELS + o_r, b_dg * tl.load(GS + o_r, mask=m_r, other=0.0).to(tl.float32), mask=m_r)
    if HAS_CMP:
        b_dg = tl.sum(b_do * tl.load(OC + off, mask=m, other=0.0).to(tl.float32), 1)
        tl.store(DGC + o_r, b_dg.to(DGC.dtype.element_ty), mask=m_r)
        tl.store(DELC + o_r, b_dg * tl.load(GC + o_r, mask=m_r, other=0.0).to(tl.float32), mask=m_r)
    if HAS_SWA:
        b_dg = tl.sum(b_do * tl.load(OW + off, mask=m, other=0.0).to(tl.float32), 1)
        tl.store(DGW + o_r, b_dg.to(DGW.dtype.element_ty), mask=m_r)
        b_gw = tl.load(GW + o_r, mask=m_r, other=0.0).to(tl.float32)
        tl.store(DOW + off, (b_do * b_gw[:, None]).to(DOW.dtype.element_ty), mask=m)


def gate_bwd(do, o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa):
    """-> (dg_cmp, dg_slc, dg_swa, delta_cmp, delta_slc, do_swa); the cmp / swa entries are None without their
    gate. dg_x = rowsum(dO o_x) in the gate's dtype, delta_x = g_x dg_x float32 [B, T_q, HQ], do_swa = g_swa dO in
    o_swa's dtype."""
    R, DV = do.numel() // do.shape[-1], do.shape[-1]
    has_cmp, has_swa = g_cmp is not None, g_swa is not None
    dg_slc = torch.empty_like(g_slc)
    delta_slc = torch.empty(g_slc.shape, dtype=torch.float32, device=do.device)
    dg_cmp = torch.empty_like(g_cmp) if has_cmp else None
    delta_cmp = torch.empty_like(delta_slc) if has_cmp else None
    dg_swa = torch.empty_like(g_swa) if has_swa else None
    do_swa = torch.empty(do.shape, dtype=o_swa.dtype, device=do.device) if has_swa else None
    if R:
        BV = triton.next_power_of_2(DV)
        BR = max(1, min(64, 4096 // BV))
        _gate_bwd_kernel[(triton.cdiv(R, BR),)](
            do, o_cmp if has_cmp else do, o_slc, o_swa if has_swa else do, g_cmp if has_cmp else g_slc, g_slc,
            g_swa if has_swa else g_slc, dg_cmp if has_cmp else dg_slc, dg_slc, dg_swa if has_swa else dg_slc,
            delta_cmp if has_cmp else delta_slc, delta_slc, do_swa if has_swa else do, R,
            DV=DV, BR=BR, BV=BV, HAS_CMP=has_cmp, HAS_SWA=has_swa, num_warps=4)
    return dg_cmp, dg_slc, dg_swa, delta_cmp, delta_slc, do_swa


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


class NSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g_cmp, g_slc, g_swa, o_swa, block_counts, block_size, scale, block_indices):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g_cmp, g_slc, g_swa, o_swa = (_contiguous(t) for t in (g_cmp, g_slc, g_swa, o_swa))
        Tk = k.shape[1]
        need_cmp = g_cmp is not None or block_indices is None
        k_cmp = v_cmp = o_cmp = lse_cmp = None
        if need_cmp:
            k_cmp = mean_pool_blocks(k.float(), block_size).to(k.dtype)
            v_cmp = mean_pool_blocks(v.float(), block_size).to(v.dtype)
            o_cmp, lse_cmp = cmp_fwd(q, k_cmp, v_cmp, Tk, block_size, scale)
        if block_indices is None:
            idx = top_blocks(block_importance(q, k_cmp, lse_cmp, Tk, block_size, scale), block_counts)
            bi = idx.to(torch.int32).contiguous()  # ascending, unique, in range: already clean
        else:
            bi = clean_block_indices(block_indices, Tk, block_size)
            idx = bi  # a new tensor (the caller's indices are returned by nsa_fused)
        if g_cmp is None:
            o_cmp = lse_cmp = None
        combine = dict(g_slc=g_slc, g_cmp=g_cmp, o_cmp=o_cmp, g_swa=g_swa, o_swa=o_swa)
        o_slc, lse_slc, out = slc_fwd(q, k, v, bi, block_size, scale, combine)
        ctx.save_for_backward(q, k, v, k_cmp, v_cmp, o_cmp, lse_cmp, o_slc, lse_slc, bi, g_cmp, g_slc, g_swa, o_swa)
        ctx.block_size, ctx.scale = block_size, scale
        ctx.mark_non_differentiable(idx)
        return out, idx

    @staticmethod
    def backward(ctx, do, _didx):
        q, k, v, k_cmp, v_cmp, o_cmp, lse_cmp, o_slc, lse_slc, bi, g_cmp, g_slc, g_swa, o_swa = ctx.saved_tensors
        bs, scale = ctx.block_size, ctx.scale
        do = do.contiguous()
        dg_cmp, dg_slc, dg_swa, delta_cmp, delta_slc, do_swa = gate_bwd(do, o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)
        dq_cmp = dk_cmp = dv_cmp = None
        if g_cmp is not None:
            dq_cmp, dk_cmp, dv_cmp = cmp_bwd(q, k_cmp, v_cmp, o_cmp, lse_cmp, do, k.shape[1], bs, scale, gate=g_cmp,
                                             delta=delta_cmp, grad_dtype=torch.float32)
        dq, dk, dv = slc_bwd(q, k, v, o_slc, lse_slc, do, bi, bs, scale, gate=g_slc, delta=delta_slc,
                             dq_in=dq_cmp, dk_cmp=dk_cmp, dv_cmp=dv_cmp)
        return dq, dk, dv, dg_cmp, dg_slc, dg_swa, do_swa, None, None, None, None


def nsa_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cmp: Optional[torch.Tensor],
              g_slc: torch.Tensor, g_swa: Optional[torch.Tensor], o_swa: Optional[torch.Tensor], block_counts: int,
              block_size: int, scale: float, block_indices: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """NSA output [B, T_q, HQ, V] in q.dtype and the block indices used ([B, T_q, H, S] int64 from the top-k, or
    ``block_indices`` as given). ``g_slc`` is required; ``g_cmp`` None leaves the compressed branch out of the sum;
    ``g_swa`` and ``o_swa`` (the window branch's output) come together or not at all. Differentiable in q, k, v, the
    gates and o_swa."""
    if (g_swa is None) != (o_swa is None):
        raise ValueError("g_swa and o_swa must be given together (the window branch) or both be None")
    out, idx = NSAFunction.apply(q, k, v, g_cmp, g_slc, g_swa, o_swa, block_counts, block_size, scale, block_indices)
    return out, (idx if block_indices is None else block_indices)
