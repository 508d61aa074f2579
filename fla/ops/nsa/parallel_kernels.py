"""Triton kernels of NSA's selected-block attention: forward, and backward as a dq kernel + a dk/dv kernel.

Layout: q [B, T_q, HQ, K], k [B, T_k, H, K], v [B, T_k, H, V], block_indices [B, T_q, H, S] (int32, -1 = none,
no block twice); queries are the last T_q of the T_k tokens (query t sits at position P = T_k - T_q + t). One
program handles the G query heads of one kv head together (they share the selected blocks): the group is the row
dimension of the dots (padded to BG >= 16). Every tile is loaded once in its natural layout; transposed operands are
``tl.trans`` of loaded tiles.

    forward, per (query, kv head):   online softmax over the tokens j <= P of the S selected blocks;
                                     saves lse [B, T_q, HQ] (natural log, float32). Optionally also writes the gated
                                     sum of the three NSA branches, out = g_slc o_slc + g_cmp o_cmp + g_swa o_swa,
                                     from the float32 o_slc (``fla.ops.nsa.fused``).
    dq, per (query, kv head):        dQ = sum_blocks P * (dO V^T - delta) K * scale
    dk/dv, per (key block, kv head): loops over the queries that selected the block only (a CSR list built in torch
                                     from block_indices), in tiles of BM queries x BG heads, computing P^T directly;
                                     every key block belongs to one program: no atomics.

Backward options (``fla.ops.nsa.fused``): dO may be the gradient of the gated sum, the branch's gate [B, T_q, HQ]
then scales its rows on load (dO_slc = g_slc dO, rounded to dO's dtype as a materialised product would be);
``delta`` = rowsum(dO_slc * o_slc) may be given; dq may be added to an existing dq (the compressed branch's); the
compressed branch's gradient of the mean-pooled keys / values may be spread over each complete block's tokens
(dk_j += dk_cmp[j // BS] / BS) in the dk/dv kernel's epilogue.

Numerics: scores in float32 with exp2 (scale folded with log2(e)); fp32 accumulators; dots take the input dtype,
float32 inputs with ``input_precision='ieee'``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fla.utils import triton_interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _gated_rows(DO, GATE, row, m_row, m_v, o_v, DV: tl.constexpr, HAS_GATE: tl.constexpr):
    """dO rows [R, BV] in dO's dtype, times the gate of each row when HAS_GATE."""
    b_do = tl.load(DO + row[:, None] * DV + o_v[None, :], mask=m_row[:, None] & m_v[None, :], other=0.0)
    if HAS_GATE:
        b_g = tl.load(GATE + row, mask=m_row, other=0.0).to(tl.float32)
        b_do = (b_do.to(tl.float32) * b_g[:, None]).to(DO.dtype.element_ty)
    return b_do


@triton.jit
def _slc_fwd_kernel(
    Q, K, Vp, O, LSE, BI, OC, OW, GC, GS, GW, OUT, qk_scale, Tq, Tk,
    S: tl.constexpr, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, COMBINE: tl.constexpr, HAS_CMP: tl.constexpr, HAS_SWA: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    P = i_t + Tk - Tq

    o_g = tl.arange(0, BG)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_j = tl.arange(0, BN)
    m_g = o_g < G
    m_k = o_k < DK
    m_v = o_v < DV

    row = (i_b * Tq + i_t) * HQ + i_h * G + o_g  # [BG]
    b_q = tl.load(Q + row[:, None] * DK + o_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.0)

    b_mi = tl.full([BG], -1e30, dtype=tl.float32)
    b_li = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BV], dtype=tl.float32)
    bi_base = ((i_b * Tq + i_t) * H + i_h) * S
    for i_s in range(S):
        blk = tl.load(BI + bi_base + i_s).to(tl.int64)
        o_n = blk * BS + o_j
        valid = (blk >= 0) & (o_j < BS) & (o_n <= P)
        krow = (i_b * Tk + o_n) * H + i_h
        b_k = tl.load(K + krow[:, None] * DK + o_k[None, :], mask=valid[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(Vp + krow[:, None] * DV + o_v[None, :], mask=valid[:, None] & m_v[None, :], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_s = tl.where(valid[None, :], b_s, float("-inf"))
        b_mnew = tl.maximum(b_mi, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mnew[:, None])
        b_alpha = tl.exp2(b_mi - b_mnew)
        b_li = b_li * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        b_mi = b_mnew

    b_li = tl.where(b_li > 0, b_li, 1.0)
    b_o = b_acc / b_li[:, None]
    m_o = m_g[:, None] & m_v[None, :]
    tl.store(O + row[:, None] * DV + o_v[None, :], b_o.to(O.dtype.element_ty), mask=m_o)
    tl.store(LSE + row, (b_mi + tl.log2(b_li)) * 0.6931471805599453, mask=m_g)
    if COMBINE:
        b_out = b_o * tl.load(GS + row, mask=m_g, other=0.0).to(tl.float32)[:, None]
        if HAS_CMP:
            b_oc = tl.load(OC + row[:, None] * DV + o_v[None, :], mask=m_o, other=0.0).to(tl.float32)
            b_out += b_oc * tl.load(GC + row, mask=m_g, other=0.0).to(tl.float32)[:, None]
        if HAS_SWA:
            b_ow = tl.load(OW + row[:, None] * DV + o_v[None, :], mask=m_o, other=0.0).to(tl.float32)
            b_out += b_ow * tl.load(GW + row, mask=m_g, other=0.0).to(tl.float32)[:, None]
        tl.store(OUT + row[:, None] * DV + o_v[None, :], b_out.to(OUT.dtype.element_ty), mask=m_o)


@triton.jit
def _slc_bwd_dq_kernel(
    Q, K, Vp, DO, GATE, LSE, DELTA, DQ, DQ_IN, BI, qk_scale, scale, Tq, Tk,
    S: tl.constexpr, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, HAS_GATE: tl.constexpr, ADD_DQ: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    P = i_t + Tk - Tq

    o_g = tl.arange(0, BG)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    o_j = tl.arange(0, BN)
    m_g = o_g < G
    m_k = o_k < DK
    m_v = o_v < DV

    row = (i_b * Tq + i_t) * HQ + i_h * G + o_g
    b_q = tl.load(Q + row[:, None] * DK + o_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.0)
    b_do = _gated_rows(DO, GATE, row, m_g, m_v, o_v, DV, HAS_GATE)
    b_lse = tl.load(LSE + row, mask=m_g, other=0.0) * 1.4426950408889634
    b_delta = tl.load(DELTA + row, mask=m_g, other=0.0)
    b_dq = tl.zeros([BG, BK], dtype=tl.float32)
    bi_base = ((i_b * Tq + i_t) * H + i_h) * S
    for i_s in range(S):
        blk = tl.load(BI + bi_base + i_s).to(tl.int64)
        o_n = blk * BS + o_j
        valid = (blk >= 0) & (o_j < BS) & (o_n <= P)
        krow = (i_b * Tk + o_n) * H + i_h
        b_k = tl.load(K + krow[:, None] * DK + o_k[None, :], mask=valid[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(Vp + krow[:, None] * DV + o_v[None, :], mask=valid[:, None] & m_v[None, :], other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_p = tl.where(valid[None, :] & m_g[:, None], tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    b_dq = b_dq * scale
    m_dq = m_g[:, None] & m_k[None, :]
    if ADD_DQ:
        b_dq += tl.load(DQ_IN + row[:, None] * DK + o_k[None, :], mask=m_dq, other=0.0).to(tl.float32)
    tl.store(DQ + row[:, None] * DK + o_k[None, :], b_dq.to(DQ.dtype.element_ty), mask=m_dq)


@triton.jit
def _slc_bwd_dkdv_kernel(
    Q, K, Vp, DO, GATE, LSE, DELTA, DK_out, DV_out, DKC, DVC, OFFSETS, QIDX, qk_scale, scale, Tq, Tk, NB, NBC,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, HAS_GATE: tl.constexpr, ADD_CMP: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H

    o_j = tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV
    o_n = i_c * BS + o_j
    m_n = (o_j < BS) & (o_n < Tk)
    krow = (i_b * Tk + o_n) * H + i_h
    b_k = tl.load(K + krow[:, None] * DK + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
    b_v = tl.load(Vp + krow[:, None] * DV + o_v[None, :], mask=m_n[:, None] & m_v[None, :], other=0.0)
    b_dk = tl.zeros([BN, BK], dtype=tl.float32)
    b_dv = tl.zeros([BN, BV], dtype=tl.float32)

    slot = (i_b * H + i_h) * NB + i_c
    lo = tl.load(OFFSETS + slot)
    hi = tl.load(OFFSETS + slot + 1)
    o_r = tl.arange(0, BM * BG)
    r_m = o_r // BG  # query of the tile
    r_g = o_r % BG   # head of the group
    for start in range(lo, hi, BM):
        m_r = ((start + r_m) < hi) & (r_g < G)
        i_t = tl.load(QIDX + start + r_m, mask=m_r, other=0).to(tl.int64)
        P = i_t + Tk - Tq
        row = (i_b * Tq + i_t) * HQ + i_h * G + r_g  # [R]
        b_q = tl.load(Q + row[:, None] * DK + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_do = _gated_rows(DO, GATE, row, m_r, m_v, o_v, DV, HAS_GATE)
        b_lse = tl.load(LSE + row, mask=m_r, other=0.0) * 1.4426950408889634
        b_delta = tl.load(DELTA + row, mask=m_r, other=0.0)

        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale  # [BN, R]
        allowed = m_n[:, None] & m_r[None, :] & (o_n[:, None] <= P[None, :])
        b_pt = tl.where(allowed, tl.exp2(b_st - b_lse[None, :]), 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)  # [BN, R]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)

    b_dk = b_dk * scale
    if ADD_CMP:  # the gradient of this block's mean-pooled key / value, when the block is complete
        full = i_c < NBC
        crow = (i_b * NBC + i_c) * H + i_h
        b_dkc = tl.load(DKC + crow * DK + o_k, mask=m_k & full, other=0.0).to(tl.float32)
        b_dvc = tl.load(DVC + crow * DV + o_v, mask=m_v & full, other=0.0).to(tl.float32)
        b_dk += b_dkc[None, :] * (1.0 / BS)
        b_dv += b_dvc[None, :] * (1.0 / BS)
    tl.store(DK_out + krow[:, None] * DK + o_k[None, :], b_dk.to(DK_out.dtype.element_ty),
             mask=m_n[:, None] & m_k[None, :])
    tl.store(DV_out + krow[:, None] * DV + o_v[None, :], b_dv.to(DV_out.dtype.element_ty),
             mask=m_n[:, None] & m_v[None, :])


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _tiles(q: torch.Tensor, v: torch.Tensor, block_size: int, G: int) -> Tuple[int, int, int, int]:
    """(BG, BN, BK, BV): padded group, block, key and value widths (>= 16: the minimum of tl.dot)."""
    return (max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(block_size)),
            max(16, triton.next_power_of_2(q.shape[-1])), max(16, triton.next_power_of_2(v.shape[-1])))


def clean_block_indices(block_indices: torch.Tensor, num_keys: int, block_size: int) -> torch.Tensor:
    """int32 contiguous copy with out-of-range blocks and repeats of a block replaced by -1 (each selected block
    counts once, as in the reference)."""
    nb = triton.cdiv(num_keys, block_size)
    idx = block_indices.long()
    idx = torch.where((idx >= 0) & (idx < nb), idx, -1)
    idx = idx.sort(-1).values
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
    return idx.masked_fill(dup, -1).to(torch.int32).contiguous()


# launch settings: (num_warps, num_stages) of the forward and dq kernels, (num_warps, num_stages, BM queries a tile)
# of the dk/dv kernel; ``launch`` arguments override them (benchmarks.ops.tune_nsa). bf16 / fp16 with head dims <= 64:
# the fastest of the H200 sweep at B8-T4096-HQ32-H2-D64 (forward 1.99 ms vs 2.48 with (4, 2); dq and dk/dv kernels
# 2.9 ms and 1.2 ms faster than (8, 1)). float32 or larger heads: one stage (two overflow shared memory at fp32 D128)
FWD_LAUNCH = (2, 2)
DQ_LAUNCH = (2, 2)
DKDV_LAUNCH = (4, 1, None)  # BM None: 64 // BG (64 rows a tile)
WIDE_LAUNCH = ((4, 1), (8, 1), (8, 1, None))  # (forward, dq, dk/dv) for float32 or head dims > 64


def _defaults(q: torch.Tensor, v: torch.Tensor):
    """(forward, dq, dk/dv) launch settings for these inputs."""
    if q.dtype != torch.float32 and max(q.shape[-1], v.shape[-1]) <= 64:
        return FWD_LAUNCH, DQ_LAUNCH, DKDV_LAUNCH
    return WIDE_LAUNCH


def slc_fwd(q, k, v, block_indices, block_size: int, scale: float, combine: Optional[dict] = None,
            launch: Optional[Tuple[int, int]] = None):
    """-> (o [B, T_q, HQ, V] in q.dtype, lse [B, T_q, HQ] float32, out). Inputs contiguous, block_indices cleaned.

    ``combine``: None (out is None), or a dict with the gates ``g_slc`` (required), ``g_cmp`` / ``g_swa`` and the
    branch outputs ``o_cmp`` / ``o_swa`` (each pair present or None), all contiguous [B, T_q, HQ, *]: out is then the
    gated sum of the branches in q.dtype."""
    B, Tq, HQ, DK = q.shape
    Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    S = block_indices.shape[-1]
    o = torch.empty(B, Tq, HQ, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Tq, HQ, dtype=torch.float32, device=q.device)
    out = torch.empty_like(o) if combine is not None else None
    if B * Tq == 0:
        return o, lse, out
    c = combine or {}
    has_cmp, has_swa = c.get("g_cmp") is not None, c.get("g_swa") is not None
    BG, BN, BK, BV = _tiles(q, v, block_size, G)
    _slc_fwd_kernel[(Tq, B * H)](
        q, k, v, o, lse, block_indices, c.get("o_cmp") if has_cmp else o, c.get("o_swa") if has_swa else o,
        c.get("g_cmp") if has_cmp else lse, c.get("g_slc", lse), c.get("g_swa") if has_swa else lse,
        out if out is not None else o, scale * LOG2E, Tq, Tk,
        S=S, HQ=HQ, H=H, G=G, DK=DK, DV=DV, BS=block_size, BG=BG, BN=BN, BK=BK, BV=BV, PRECISION=_precision(q),
        COMBINE=combine is not None, HAS_CMP=has_cmp, HAS_SWA=has_swa, **_launch(launch or _defaults(q, v)[0]),
    )
    return o, lse, out


def _launch(cfg) -> dict:
    """Triton launch keywords from (num_warps, num_stages, ...); one warp group and one stage in the interpreter."""
    if triton_interpreting():
        return dict(num_warps=4, num_stages=1)
    return dict(num_warps=cfg[0], num_stages=cfg[1])


def _query_lists(block_indices: torch.Tensor, H: int, num_blocks: int):
    """CSR of the queries selecting each (batch, kv head, block): (offsets [B H NB + 1] int32, query ids int32,
    ascending inside each list)."""
    B, Tq, _, S = block_indices.shape
    valid = block_indices >= 0
    b, t, h, _ = valid.nonzero(as_tuple=True)
    key = (b * H + h) * num_blocks + block_indices[valid].long()
    key, order = torch.sort(key, stable=True)
    qidx = t[order].to(torch.int32).contiguous()
    counts = torch.bincount(key, minlength=B * H * num_blocks)
    offsets = torch.zeros(B * H * num_blocks + 1, dtype=torch.int32, device=block_indices.device)
    offsets[1:] = counts.cumsum(0)
    return offsets, qidx


def slc_bwd(q, k, v, o, lse, do, block_indices, block_size: int, scale: float, gate=None, delta=None, dq_in=None,
            dk_cmp=None, dv_cmp=None, dq_launch=None, dkdv_launch=None):
    """Gradients (dq, dk, dv) of the selected attention, in the dtypes of q, k, v.

    Options (all contiguous): ``gate`` [B, T_q, HQ] scales dO's rows (dO is then the gated sum's gradient);
    ``delta`` [B, T_q, HQ] float32 = rowsum(dO_slc * o) (computed from o otherwise); ``dq_in`` is added to dq;
    ``dk_cmp`` / ``dv_cmp`` [B, T_k // BS, H, *]: gradients of the mean-pooled blocks, spread over their tokens."""
    B, Tq, HQ, DK = q.shape
    Tk, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    S = block_indices.shape[-1]
    dq = torch.empty_like(q) if dq_in is None or dq_in.dtype != q.dtype else dq_in
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if B * Tk == 0:
        return dq, dk, dv
    BG, BN, BK, BV = _tiles(q, v, block_size, G)
    if delta is None:
        do_slc = do if gate is None else (do.float() * gate.float()[..., None])
        delta = (o.float() * do_slc.float()).sum(-1).contiguous()  # [B, Tq, HQ]
    common = dict(HQ=HQ, H=H, G=G, DK=DK, DV=DV, BS=block_size, BG=BG, BN=BN, BK=BK, BV=BV,
                  PRECISION=_precision(q), HAS_GATE=gate is not None)
    g = gate if gate is not None else lse
    if Tq > 0:
        _slc_bwd_dq_kernel[(Tq, B * H)](q, k, v, do, g, lse, delta, dq, dq_in if dq_in is not None else dq,
                                        block_indices, scale * LOG2E, scale, Tq, Tk,
                                        S=S, ADD_DQ=dq_in is not None, **common,
                                        **_launch(dq_launch or _defaults(q, v)[1]))
    NB = triton.cdiv(Tk, block_size)
    offsets, qidx = _query_lists(block_indices, H, NB)
    if qidx.numel() == 0:
        qidx = torch.zeros(1, dtype=torch.int32, device=q.device)
    cfg = dkdv_launch or _defaults(q, v)[2]
    BM = 2 if triton_interpreting() else (cfg[2] or max(1, 64 // BG))
    add_cmp = dk_cmp is not None
    _slc_bwd_dkdv_kernel[(NB, B * H)](q, k, v, do, g, lse, delta, dk, dv, dk_cmp if add_cmp else dk,
                                      dv_cmp if add_cmp else dv, offsets, qidx, scale * LOG2E, scale, Tq, Tk,
                                      NB, Tk // block_size, BM=BM, ADD_CMP=add_cmp, **common, **_launch(cfg))
    return dq, dk, dv


class SelectedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        block_indices = clean_block_indices(block_indices, k.shape[1], block_size)
        o, lse, _ = slc_fwd(q, k, v, block_indices, block_size, scale)
        ctx.save_for_backward(q, k, v, o, lse, block_indices)
        ctx.block_size, ctx.scale = block_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_indices = ctx.saved_tensors
        dq, dk, dv = slc_bwd(q, k, v, o, lse, do.contiguous(), block_indices, ctx.block_size, ctx.scale)
        return dq, dk, dv, None, None, None


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                       block_size: int, scale: float) -> torch.Tensor:
    """Softmax attention of each query over the tokens j <= P of its selected blocks (Triton; differentiable in
    q, k, v). q [B, T_q, HQ, K], k [B, T_k, H, K], v [B, T_k, H, V], block_indices [B, T_q, H, S] -> o in q.dtype."""
    return SelectedAttentionFunction.apply(q, k, v, block_indices, block_size, scale)
