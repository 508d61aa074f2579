"""Triton kernels of NSA's compressed branch: attention over mean-pooled blocks (forward, dq, dk/dv) and the block
importance used by the top-k selection.

Layout: q [B, T_q, HQ, K]; k_cmp [B, NB, H, K], v_cmp [B, NB, H, V] (NB = T_k // BS complete blocks); the query t sits
at position P = T_k - T_q + t and sees the blocks c < NC = (P + 1) // BS. lse [B, T_q, HQ] (natural log, float32)
is 0 for a query without any visible block (its output is 0), as in the reference.

    forward, per (query tile, q head):    online softmax over the visible blocks
    dq, per (query tile, q head):         dQ = sum P * (dO Vc^T - delta) Kc * scale
    dk/dv, per (block tile, kv head, head of the group): loops over the queries that see the tile (P^T computed
                                          directly); the G per-head partial gradients are summed in torch
    importance, per (query tile, kv head): I[t, c] = sum_g exp(scale q_g . k_c - lse_g) for c < IC = P // BS,
                                          forced ranks G + 2 / G + 1 / G for blocks IC / IC - 1 / 0, -inf above IC;
                                          [B, T_q, H, NBC] float32, then ``torch.topk``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla.ops.nsa.parallel_kernels import _gated_rows
from fla.utils import triton_interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _cmp_fwd_kernel(
    Q, KC, VC, O, LSE, qk_scale, Tq, Tk, NB,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // HQ).to(tl.int64)
    i_hq = i_bh % HQ
    i_h = i_hq // G
    off = Tk - Tq
    o_m = i_m * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < Tq
    m_k = o_k < DK
    m_v = o_v < DV
    nc = (o_m + off + 1) // BS  # visible blocks per query
    row = (i_b * Tq + o_m) * HQ + i_hq
    b_q = tl.load(Q + row[:, None] * DK + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)

    b_mi = tl.full([BM], -1e30, dtype=tl.float32)
    b_li = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BV], dtype=tl.float32)
    hi = tl.minimum((tl.minimum((i_m + 1) * BM, Tq) + off) // BS, NB)
    for start in range(0, hi, BC):
        o_c = start + tl.arange(0, BC)
        crow = (i_b * NB + o_c) * H + i_h
        m_c = o_c < NB
        b_kt = tl.trans(tl.load(KC + crow[:, None] * DK + o_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.0))
        b_v = tl.load(VC + crow[:, None] * DV + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
        b_s = tl.where(o_c[None, :] < nc[:, None], b_s, float("-inf"))
        b_mnew = tl.maximum(b_mi, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mnew[:, None])
        b_alpha = tl.exp2(b_mi - b_mnew)
        b_li = b_li * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        b_mi = b_mnew
    has = b_li > 0
    b_o = b_acc / tl.where(has, b_li, 1.0)[:, None]
    tl.store(O + row[:, None] * DV + o_v[None, :], b_o.to(O.dtype.element_ty), mask=m_m[:, None] & m_v[None, :])
    b_lse = tl.where(has, (b_mi + tl.log2(tl.where(has, b_li, 1.0))) * 0.6931471805599453, 0.0)
    tl.store(LSE + row, b_lse, mask=m_m)


@triton.jit
def _cmp_bwd_dq_kernel(
    Q, KC, VC, DO, GATE, LSE, DELTA, DQ, qk_scale, scale, Tq, Tk, NB,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // HQ).to(tl.int64)
    i_hq = i_bh % HQ
    i_h = i_hq // G
    off = Tk - Tq
    o_m = i_m * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < Tq
    m_k = o_k < DK
    m_v = o_v < DV
    nc = (o_m + off + 1) // BS
    row = (i_b * Tq + o_m) * HQ + i_hq
    b_q = tl.load(Q + row[:, None] * DK + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
    b_do = _gated_rows(DO, GATE, row, m_m, m_v, o_v, DV, HAS_GATE)
    b_lse = tl.load(LSE + row, mask=m_m, other=0.0) * 1.4426950408889634
    b_delta = tl.load(DELTA + row, mask=m_m, other=0.0)
    b_dq = tl.zeros([BM, BK], dtype=tl.float32)
    hi = tl.minimum((tl.minimum((i_m + 1) * BM, Tq) + off) // BS, NB)
    for start in range(0, hi, BC):
        o_c = start + tl.arange(0, BC)
        crow = (i_b * NB + o_c) * H + i_h
        m_c = o_c < NB
        b_k = tl.load(KC + crow[:, None] * DK + o_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(VC + crow[:, None] * DV + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        allowed = (o_c[None, :] < nc[:, None]) & m_m[:, None]
        b_p = tl.where(allowed, tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    b_dq = b_dq * scale
    tl.store(DQ + row[:, None] * DK + o_k[None, :], b_dq.to(DQ.dtype.element_ty), mask=m_m[:, None] & m_k[None, :])


@triton.jit
def _cmp_bwd_dkdv_kernel(
    Q, KC, VC, DO, GATE, LSE, DELTA, DKC, DVC, qk_scale, scale, Tq, Tk, NB,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    # program (block tile, batch x kv head, head of the group): this head's share of the tile's gradients, written to
    # the head's slice of DKC / DVC [G, B, NB, H, *] (float32, summed over the heads afterwards)
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_g = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    i_hq = i_h * G + i_g
    off = Tk - Tq
    o_c = i_c * BC + tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_c = o_c < NB
    m_k = o_k < DK
    m_v = o_v < DV
    crow = (i_b * NB + o_c) * H + i_h
    b_k = tl.load(KC + crow[:, None] * DK + o_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.0)
    b_v = tl.load(VC + crow[:, None] * DV + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    b_dv = tl.zeros([BC, BV], dtype=tl.float32)
    # the first query that sees block i_c * BC completes it: position (i_c * BC + 1) * BS - 1
    lo = tl.maximum((i_c * BC + 1) * BS - 1 - off, 0) // BM * BM  # int32, like Tq
    for start in range(lo, Tq, BM):
        o_m = start + tl.arange(0, BM)
        m_m = o_m < Tq
        nc = (o_m + off + 1) // BS
        row = (i_b * Tq + o_m) * HQ + i_hq
        b_q = tl.load(Q + row[:, None] * DK + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_do = _gated_rows(DO, GATE, row, m_m, m_v, o_v, DV, HAS_GATE)
        b_lse = tl.load(LSE + row, mask=m_m, other=0.0) * 1.4426950408889634
        b_delta = tl.load(DELTA + row, mask=m_m, other=0.0)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale  # [BC, BM]
        allowed = (o_c[:, None] < nc[None, :]) & m_m[None, :] & m_c[:, None]
        b_pt = tl.where(allowed, tl.exp2(b_st - b_lse[None, :]), 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
    b_dk = b_dk * scale
    prow = i_g.to(tl.int64) * (tl.num_programs(1).to(tl.int64) * NB) + crow  # head slices of B * NB * H rows
    tl.store(DKC + prow[:, None] * DK + o_k[None, :], b_dk, mask=m_c[:, None] & m_k[None, :])
    tl.store(DVC + prow[:, None] * DV + o_v[None, :], b_dv, mask=m_c[:, None] & m_v[None, :])


@triton.jit
def _importance_kernel(
    Q, KC, LSE, IMP, qk_scale, Tq, Tk, NB, NBC,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, BS: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    off = Tk - Tq
    o_m = i_m * BM + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    m_m = o_m < Tq
    m_k = o_k < DK
    ic = (o_m + off) // BS  # current block per query
    for start in range(0, NBC, BC):
        o_c = start + tl.arange(0, BC)
        m_c = o_c < NB
        crow = (i_b * NB + o_c) * H + i_h
        b_kt = tl.trans(tl.load(KC + crow[:, None] * DK + o_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.0))
        b_imp = tl.zeros([BM, BC], dtype=tl.float32)
        for i_g in range(G):
            row = (i_b * Tq + o_m) * HQ + i_h * G + i_g
            b_q = tl.load(Q + row[:, None] * DK + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
            b_lse = tl.load(LSE + row, mask=m_m, other=0.0) * 1.4426950408889634
            b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
            b_imp += tl.where(o_c[None, :] < ic[:, None], tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_imp = tl.where(o_c[None, :] == 0, G * 1.0, b_imp)
        b_imp = tl.where(o_c[None, :] == ic[:, None] - 1, G + 1.0, b_imp)
        b_imp = tl.where(o_c[None, :] == ic[:, None], G + 2.0, b_imp)
        b_imp = tl.where(o_c[None, :] > ic[:, None], float("-inf"), b_imp)
        irow = ((i_b * Tq + o_m) * H + i_h) * NBC
        tl.store(IMP + irow[:, None] + o_c[None, :], b_imp, mask=m_m[:, None] & (o_c < NBC)[None, :])


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _tiles(q: torch.Tensor, v: torch.Tensor):
    BM, BC = (16, 16) if triton_interpreting() else (64, 64)
    return BM, BC, max(16, triton.next_power_of_2(q.shape[-1])), max(16, triton.next_power_of_2(v.shape[-1]))


def cmp_fwd(q, k_cmp, v_cmp, num_keys: int, block_size: int, scale: float):
    """-> (o_cmp [B, T_q, HQ, V] in q.dtype, lse [B, T_q, HQ] float32). Inputs contiguous."""
    B, Tq, HQ, DK = q.shape
    NB, H, DV = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    o = torch.empty(B, Tq, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
    if B * Tq == 0:
        return o, lse
    BM, BC, BK, BV = _tiles(q, v_cmp)
    _cmp_fwd_kernel[(triton.cdiv(Tq, BM), B * HQ)](
        q, k_cmp, v_cmp, o, lse, scale * LOG2E, Tq, num_keys, NB,
        HQ=HQ, H=H, G=HQ // H, DK=DK, DV=DV, BS=block_size, BM=BM, BC=BC, BK=BK, BV=BV, PRECISION=_precision(q),
    )
    return o, lse


def cmp_bwd(q, k_cmp, v_cmp, o, lse, do, num_keys: int, block_size: int, scale: float, gate=None, delta=None,
            grad_dtype=None):
    """Gradients (dq, dk_cmp, dv_cmp) of the compressed attention.

    ``gate`` [B, T_q, HQ] scales dO's rows (dO is then the gated sum's gradient); ``delta`` [B, T_q, HQ] float32 =
    rowsum(dO_cmp * o) (computed from o otherwise); ``grad_dtype``: dtype of dk_cmp / dv_cmp (default theirs)."""
    B, Tq, HQ, DK = q.shape
    NB, H, DV = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    G = HQ // H
    dq = torch.empty_like(q)
    # per-head partial gradients of the blocks, summed below (deterministic; G programs per block tile)
    dkc = torch.empty(G, B, NB, H, DK, dtype=torch.float32, device=q.device)
    dvc = torch.empty(G, B, NB, H, DV, dtype=torch.float32, device=q.device)
    BM, BC, BK, BV = _tiles(q, v_cmp)
    if delta is None:
        do_cmp = do if gate is None else (do.float() * gate.float()[..., None])
        delta = (o.float() * do_cmp.float()).sum(-1).contiguous()
    g = gate if gate is not None else lse
    # float32 or heads wider than 64: one pipeline stage (the default stages of the dk/dv kernel need 247 KB of
    # shared memory at float32 D128, over the H200's 232 KB); bf16 / fp16 D <= 64 keep Triton's default
    stages = {} if q.dtype != torch.float32 and max(DK, DV) <= 64 else {"num_stages": 1}
    common = dict(HQ=HQ, H=H, G=G, DK=DK, DV=DV, BS=block_size, BM=BM, BC=BC, BK=BK, BV=BV,
                  PRECISION=_precision(q), HAS_GATE=gate is not None, num_warps=4, **stages)
    if B * Tq > 0:
        _cmp_bwd_dq_kernel[(triton.cdiv(Tq, BM), B * HQ)](q, k_cmp, v_cmp, do, g, lse, delta, dq, scale * LOG2E,
                                                          scale, Tq, num_keys, NB, **common)
    if B * NB > 0:
        _cmp_bwd_dkdv_kernel[(triton.cdiv(NB, BC), B * H, G)](q, k_cmp, v_cmp, do, g, lse, delta, dkc, dvc,
                                                              scale * LOG2E, scale, Tq, num_keys, NB, **common)
    out_k = grad_dtype or k_cmp.dtype
    out_v = grad_dtype or v_cmp.dtype
    return dq, dkc.sum(0).to(out_k), dvc.sum(0).to(out_v)


def block_importance(q, k_cmp, lse, num_keys: int, block_size: int, scale: float) -> torch.Tensor:
    """[B, T_q, H, ceil(T_k / BS)] float32 ranking scores of the candidate blocks (see the module docstring)."""
    B, Tq, HQ, DK = q.shape
    NB, H = k_cmp.shape[1], k_cmp.shape[2]
    NBC = max(1, triton.cdiv(num_keys, block_size))
    imp = torch.empty(B, Tq, H, NBC, dtype=torch.float32, device=q.device)
    if B * Tq == 0:
        return imp
    BM, BC, BK, _ = _tiles(q, k_cmp)
    _importance_kernel[(triton.cdiv(Tq, BM), B * H)](
        q, k_cmp, lse, imp, scale * LOG2E, Tq, num_keys, NB, NBC,
        HQ=HQ, H=H, G=HQ // H, DK=DK, BS=block_size, BM=BM, BC=BC, BK=BK, PRECISION=_precision(q),
    )
    return imp


def top_blocks(importance: torch.Tensor, block_counts: int) -> torch.Tensor:
    """[B, T, H, NBC] ranking scores -> [B, T, H, block_counts] int64 block ids, ascending, -1 padded."""
    W = importance.shape[-1]
    top = min(block_counts, W)
    values, idx = importance.topk(top, dim=-1)
    idx = idx.masked_fill(values == float("-inf"), W).sort(-1).values
    idx = idx.masked_fill(idx == W, -1)
    if top < block_counts:
        idx = torch.nn.functional.pad(idx, (0, block_counts - top), value=-1)
    return idx


class CompressionAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, num_keys, block_size, scale):
        q, k_cmp, v_cmp = q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous()
        o, lse = cmp_fwd(q, k_cmp, v_cmp, num_keys, block_size, scale)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.num_keys, ctx.block_size, ctx.scale = num_keys, block_size, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        dq, dkc, dvc = cmp_bwd(q, k_cmp, v_cmp, o, lse, do.contiguous(), ctx.num_keys, ctx.block_size, ctx.scale)
        return dq, dkc, dvc, None, None, None


def compression_attention_triton(q, k_cmp, v_cmp, num_keys: int, block_size: int, scale: float):
    """(o_cmp [B, T_q, HQ, V], lse [B, T_q, HQ] float32, not differentiable); differentiable in q, k_cmp, v_cmp."""
    return CompressionAttentionFunction.apply(q, k_cmp, v_cmp, num_keys, block_size, scale)
