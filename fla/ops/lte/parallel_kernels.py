"""Triton kernels of LTE attention (window + selected keys), forward and backward with the score gradient.

Semantics (``fla.ops.lte.naive.naive_lte_attn`` is the float32 truth): query i sees key j iff j <= i and
(i - j <= w or selected_j), inside one sequence (document with ``cu_seqlens``). ``w = window_size``: the token plus
w previous ones. Scores get the straight-through gate gradient ``d score_j = sum_d dV_j[d] v_j[d]``, with dV_j
summed over the G query heads of the kv head.

Layout: q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V], o [B, T, HQ, V]; query head ``hq`` reads kv head
``hq // G``. With ``cu_seqlens`` (B = 1) programs are indexed by (sequence, block) through
``prepare_chunk_indices`` (``_block_span`` of ``fla.ops.attn.parallel_kernels``).

Selected-key index (built on the device by ``build_selected_index``, torch ops only, no host sync): per batch row
and kv head (``row = b * H + h``)
    cnt [B*H, T+1] int32: exclusive prefix count of selected positions (cnt[t] = #selected at positions < t), so
        the selected keys of a position range [a, b) are the compact entries cnt[a] .. cnt[b] - 1 and the compact
        index of a selected position t is cnt[t];
    pos [B*H, T] int32: the compact list, ascending row-local positions of the selected keys (entries >= cnt[T]
        are padding, never read);
    eos [T] int32 (packed only): end of the document of every token.
With packed documents the row's compact list spans all documents; a document's entries are a contiguous slice.

Each query tile [t0, t0 + BM) splits its keys into two disjoint sets:
    window stage: key tiles over [lo, t0 + BM) with lo = floor(max(t0 - w, 0) / BN) * BN, full mask
        (j <= i and (i - j <= w or selected_j));
    selected stage: the selected keys of the document at positions < lo, i.e. compact entries
        cnt[bos] .. cnt[bos + lo] - 1, read by gathering rows of k / v through ``pos``; they are older than every
        query's window (j < t0 - w), so only the entry count masks them.

Kernels and grids:
    forward     ``_lte_fwd_kernel``        (query blocks, B*HQ): online softmax over both stages; o and the
                                            base-2 logsumexp lse [B, HQ, T] (float32, saved for the backward).
    delta       ``_attn_bwd_preprocess_kernel`` (shared with parallel attention): rowsum(o * do).
    compact dkdv ``_lte_bwd_dkdv_selected_kernel`` (ceil(T / BC), B*H): per tile of BC compact entries, the
                                            pairs with i - j > w (query tiles from pos_first + w + 1 to the
                                            document end of the last entry, masked per element), all G query
                                            heads; writes partial dK, dV per compact entry (float32
                                            [B*H, T, K/V]). Programs past the row's count do nothing.
    window dkdv ``_lte_bwd_dkdv_window_kernel`` (key blocks, B*H): the pairs with i - j <= w (query tiles over
                                            [j0, j0 + BN + w)), all G query heads; epilogue adds the compact
                                            partial of selected keys (index cnt[j]), writes dk, dv and
                                            d score = rowsum(dV * v) in float32.
    dq          ``_lte_bwd_dq_kernel``     (query blocks, B*HQ): mirrors the forward's two stages.
The two dkdv kernels partition the visible pairs by i - j <= w / > w, the forward and dq by the key position
relative to lo; both partitions are exact, so every pair is counted once. No atomics. Operands of every dot are
loaded once; transposed operands are ``tl.trans`` of loaded tiles (never of a dot result: FLA #640). The tile
steps and the masked / interior split of the window stage are ``fla.ops.attn.tiles``' (interior tiles, where
every pair is inside the window, run without a mask).

Cost model (per (b, query head), sequence length T, window w, selection fraction f, head dims K, V; sliding-window
attention (SWA) with the same w as baseline, whose forward costs ~ 2 T (w + 1.5 BM) (K + V) flops with BM = BN):
    forward / dq flops    ~ 2 T (w + 1.5 BM) (K + V)            [window tiles, = SWA]
                          + 2 T * f * max(T/2 - w, 0) (K + V)   [selected stage: every query sees ~ f (i - w) keys]
    dkdv flops            the same split (window pairs per key tile, selected pairs per compact tile).
    Ratio to SWA ~ 1 + f (T/2 - w) / (w + 1.5 BM); with BM = 64, f = 0.125: T = 4096, w = 768: 1.18;
    T = 1000, w = 100: 1.26 (plus the gather inefficiency of the selected stage and its partial last tiles).
    Bytes: as SWA for q / o / do / lse; k, v are re-read per query tile in the selected stage (gathered rows,
    D contiguous elements each): f (T/2 - w) / BM extra kv rows per query row; the index adds 9 B per (token,
    kv head); the compact partials add f T (K + V) * 4 B * 2 (write + read) per kv head.
    Memory: the index takes 9 B per (token, kv head) (+ 8 B transient while it is built); the compact partials
    are allocated for the worst case f = 1 (no host sync): B * H * T * (K + V) * 4 B, live during the backward.
    FlexAttention's block mask cannot skip unselected keys inside a block, so with selected keys scattered over
    every block it computes all causal blocks: ~ T^2 / 2 score entries per head vs ~ T (w + 1.5 BM) +
    f T (T / 2 - w) here, a flop ratio of ~ 2.0 at (T = 4096, w = 768) and (T = 1000, w = 100) with f = 0.125;
    beating Flex by 3x there also needs better per-flop efficiency than Flex (measure on the GPU).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fla.ops.attn.parallel_kernels import _attn_bwd_preprocess_kernel, _block_span, _dims, _grid_rows, _precision
from fla.ops.attn.tiles import (dkdv_query_tiles, dkdv_tile, dq_key_tiles, dq_tile, fwd_key_tiles, load_kv_rows,
                                load_query_tile, query_tile_split, softmax_tile)
from fla.utils import autocast_custom_bwd, autocast_custom_fwd, triton_interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _lte_fwd_kernel(
    Q, K, Vp, SEL, CNT, POS, O, LSE, cu_seqlens, chunk_indices, qk_scale, T, WINDOW,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_hq = i_bh % HQ
    i_h = i_hq // G
    T_full = T
    i_m, bos, T = _block_span(i_m, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    row0 = (i_b * T_full).to(tl.int64)  # first token of the batch row: compact positions are row-local
    row_off = bos - row0
    kv_row = (i_b * H + i_h).to(tl.int64)
    lse_base = (i_b * HQ + i_hq).to(tl.int64) * T_full + row_off
    sel_base = kv_row * T_full + row_off
    cnt_base = kv_row * (T_full + 1) + row_off
    pos_base = kv_row * T_full

    t0 = i_m * BM
    o_m = t0 + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_m = o_m < T
    m_k = o_k < DK
    m_v = o_v < DV

    b_q = tl.load(Q + (bos + o_m[:, None]) * (HQ * DK) + i_hq * DK + o_k[None, :],
                  mask=m_m[:, None] & m_k[None, :], other=0.0)
    b_mi = tl.full([BM], -1e30, dtype=tl.float32)
    b_li = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BV], dtype=tl.float32)

    lo = tl.maximum(t0 - WINDOW, 0) // BN * BN
    hi = tl.minimum(t0 + BM, T)

    # selected stage: selected keys at positions < lo (older than every query's window)
    c_lo = tl.load(CNT + cnt_base)
    c_hi = tl.load(CNT + cnt_base + lo)
    for c0 in range(c_lo, c_hi, BN):
        o_c = c0 + tl.arange(0, BN)
        m_c = o_c < c_hi
        b_pos = tl.load(POS + pos_base + o_c, mask=m_c, other=0).to(tl.int64)
        b_k, b_v = load_kv_rows(K, Vp, row0 + b_pos, m_c, i_h, H, DK, DV, BK, BV, True)
        b_mi, b_li, b_acc = softmax_tile(b_q, b_k, b_v, b_mi, b_li, b_acc, m_c[None, :], qk_scale, True, PRECISION)

    # window stage: key tiles [lo, t0 + BM); edge and diagonal tiles with the full LTE mask, interior unmasked
    b_mi, b_li, b_acc = fwd_key_tiles(b_q, b_mi, b_li, b_acc, K, Vp, SEL, sel_base, bos, i_h, o_m, t0, lo, hi, T,
                                      WINDOW + 1, qk_scale, H, DK, DV, BM, BN, BK, BV, True, True, PRECISION)

    b_li = tl.where(b_li > 0, b_li, 1.0)
    b_o = b_acc / b_li[:, None]
    tl.store(O + (bos + o_m[:, None]) * (HQ * DV) + i_hq * DV + o_v[None, :],
             b_o.to(O.dtype.element_ty), mask=m_m[:, None] & m_v[None, :])
    tl.store(LSE + lse_base + o_m, b_mi + tl.log2(b_li), mask=m_m)  # base 2


@triton.jit
def _lte_bwd_dq_kernel(
    Q, K, Vp, DO, LSE, DELTA, SEL, CNT, POS, DQ, cu_seqlens, chunk_indices, qk_scale, scale, T, WINDOW,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // HQ
    i_hq = i_bh % HQ
    i_h = i_hq // G
    T_full = T
    i_m, bos, T = _block_span(i_m, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    row0 = (i_b * T_full).to(tl.int64)
    row_off = bos - row0
    kv_row = (i_b * H + i_h).to(tl.int64)
    lse_base = (i_b * HQ + i_hq).to(tl.int64) * T_full + row_off
    sel_base = kv_row * T_full + row_off
    cnt_base = kv_row * (T_full + 1) + row_off
    pos_base = kv_row * T_full

    t0 = i_m * BM
    o_m = t0 + tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    m_m = o_m < T
    m_k = o_k < DK

    b_q, b_do, b_lse, b_delta = load_query_tile(Q, DO, LSE, DELTA, bos, i_hq, lse_base, o_m, T, HQ, DK, DV, BK, BV,
                                                True)
    b_dq = tl.zeros([BM, BK], dtype=tl.float32)

    lo = tl.maximum(t0 - WINDOW, 0) // BN * BN
    hi = tl.minimum(t0 + BM, T)

    c_lo = tl.load(CNT + cnt_base)
    c_hi = tl.load(CNT + cnt_base + lo)
    for c0 in range(c_lo, c_hi, BN):
        o_c = c0 + tl.arange(0, BN)
        m_c = o_c < c_hi
        b_pos = tl.load(POS + pos_base + o_c, mask=m_c, other=0).to(tl.int64)
        b_k, b_v = load_kv_rows(K, Vp, row0 + b_pos, m_c, i_h, H, DK, DV, BK, BV, True)
        b_dq = dq_tile(b_q, b_do, b_k, b_v, b_lse, b_delta, b_dq, m_c[None, :], qk_scale, True, PRECISION)

    b_dq = dq_key_tiles(b_q, b_do, b_lse, b_delta, b_dq, K, Vp, SEL, sel_base, bos, i_h, o_m, t0, lo, hi, T,
                        WINDOW + 1, qk_scale, H, DK, DV, BM, BN, BK, BV, True, True, PRECISION)

    b_dq = b_dq * scale
    tl.store(DQ + (bos + o_m[:, None]) * (HQ * DK) + i_hq * DK + o_k[None, :],
             b_dq.to(DQ.dtype.element_ty), mask=m_m[:, None] & m_k[None, :])


@triton.jit
def _lte_bwd_dkdv_selected_kernel(
    Q, K, Vp, DO, LSE, DELTA, CNT, POS, EOS, DKC, DVC, qk_scale, T, WINDOW,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial dK, dV (unscaled, float32) of compact entries from the queries beyond their window (i - j > w)."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    kv_row = i_bh.to(tl.int64)
    row0 = (i_b * T).to(tl.int64)
    pos_base = kv_row * T
    n_sel = tl.load(CNT + kv_row * (T + 1) + T)
    c0 = i_c * BC
    if c0 < n_sel:
        o_c = c0 + tl.arange(0, BC)
        o_k = tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        m_c = o_c < n_sel
        m_k = o_k < DK
        m_v = o_v < DV
        b_pos = tl.load(POS + pos_base + o_c, mask=m_c, other=0)
        c_last = tl.minimum(c0 + BC, n_sel) - 1
        p_first = tl.load(POS + pos_base + c0)
        if IS_VARLEN:
            b_eos = tl.load(EOS + b_pos, mask=m_c, other=0)
            q_hi = tl.load(EOS + tl.load(POS + pos_base + c_last))
        else:
            b_eos = tl.zeros([BC], dtype=tl.int32) + T
            q_hi = T
        q_lo = (p_first + WINDOW + 1) // BM * BM

        b_k, b_v = load_kv_rows(K, Vp, row0 + b_pos.to(tl.int64), m_c, i_h, H, DK, DV, BK, BV, True)
        b_dk = tl.zeros([BC, BK], dtype=tl.float32)
        b_dv = tl.zeros([BC, BV], dtype=tl.float32)
        for i_g in range(G):
            i_hq = i_h * G + i_g
            lse_base = (i_b * HQ + i_hq).to(tl.int64) * T
            for start in range(q_lo, q_hi, BM):
                o_m = start + tl.arange(0, BM)
                m_m = o_m < q_hi
                b_q, b_do, b_lse, b_delta = load_query_tile(Q, DO, LSE, DELTA, row0, i_hq, lse_base, o_m, q_hi, HQ,
                                                            DK, DV, BK, BV, True)
                allowed = m_c[:, None] & m_m[None, :] & ((o_m[None, :] - b_pos[:, None]) > WINDOW) & \
                    (o_m[None, :] < b_eos[:, None])
                b_dk, b_dv = dkdv_tile(b_k, b_v, b_q, b_do, b_lse, b_delta, b_dk, b_dv, allowed, qk_scale, True,
                                       PRECISION)
        tl.store(DKC + (pos_base + o_c[:, None]) * DK + o_k[None, :], b_dk, mask=m_c[:, None] & m_k[None, :])
        tl.store(DVC + (pos_base + o_c[:, None]) * DV + o_v[None, :], b_dv, mask=m_c[:, None] & m_v[None, :])


@triton.jit
def _lte_bwd_dkdv_window_kernel(
    Q, K, Vp, DO, LSE, DELTA, SEL, CNT, DKC, DVC, DK_out, DV_out, DSCORE, cu_seqlens, chunk_indices,
    qk_scale, scale, T, WINDOW,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk, dv, d score of a key block: window pairs (i - j <= w) plus the compact partial of selected keys."""
    i_n_blk = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    T_full = T
    i_n_blk, bos, T = _block_span(i_n_blk, i_b, T, cu_seqlens, chunk_indices, IS_VARLEN)
    row0 = (i_b * T_full).to(tl.int64)
    row_off = bos - row0
    kv_row = i_bh.to(tl.int64)
    sel_base = kv_row * T_full + row_off
    cnt_base = kv_row * (T_full + 1) + row_off

    j0 = i_n_blk * BN
    o_n = j0 + tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_n = o_n < T
    m_k = o_k < DK
    m_v = o_v < DV

    b_k, b_v = load_kv_rows(K, Vp, bos + o_n, m_n, i_h, H, DK, DV, BK, BV, True)
    b_dk = tl.zeros([BN, BK], dtype=tl.float32)
    b_dv = tl.zeros([BN, BV], dtype=tl.float32)

    lo = j0 // BM * BM
    hi = tl.minimum(T, j0 + BN + WINDOW)
    mid_lo, mid_hi = query_tile_split(j0, lo, hi, T, WINDOW + 1, BM, BN, True)
    for i_g in range(G):
        i_hq = i_h * G + i_g
        lse_base = (i_b * HQ + i_hq).to(tl.int64) * T_full + row_off
        b_dk, b_dv = dkdv_query_tiles(b_k, b_v, b_dk, b_dv, Q, DO, LSE, DELTA, SEL, sel_base, lse_base, bos, i_hq,
                                      o_n, mid_lo, mid_hi, lo, hi, T, WINDOW + 1, qk_scale, HQ, DK, DV, BM, BK, BV,
                                      True, False, PRECISION)

    # epilogue: the selected keys' contributions from queries beyond the window, then the score gradient
    b_sel = (tl.load(SEL + sel_base + o_n, mask=m_n, other=0) != 0) & m_n
    b_idx = tl.load(CNT + cnt_base + o_n, mask=m_n, other=0).to(tl.int64)  # compact index of a selected key
    b_dk += tl.load(DKC + (kv_row * T_full + b_idx[:, None]) * DK + o_k[None, :],
                    mask=b_sel[:, None] & m_k[None, :], other=0.0)
    b_dv += tl.load(DVC + (kv_row * T_full + b_idx[:, None]) * DV + o_v[None, :],
                    mask=b_sel[:, None] & m_v[None, :], other=0.0)
    b_dscore = tl.sum(b_dv * b_v.to(tl.float32), 1)
    b_dk = b_dk * scale
    tl.store(DK_out + (bos + o_n[:, None]) * (H * DK) + i_h * DK + o_k[None, :],
             b_dk.to(DK_out.dtype.element_ty), mask=m_n[:, None] & m_k[None, :])
    tl.store(DV_out + (bos + o_n[:, None]) * (H * DV) + i_h * DV + o_v[None, :],
             b_dv.to(DV_out.dtype.element_ty), mask=m_n[:, None] & m_v[None, :])
    tl.store(DSCORE + (bos + o_n) * H + i_h, b_dscore, mask=m_n)


def launch_config(stage: str, DK: int, DV: int, fp32: bool = False) -> Tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) of one kernel: ``stage`` in 'fwd', 'dq', 'dkdv' (window), 'dkdv_sel'
    (BN is then the compact tile BC); ``fp32``: float32 inputs. The single place tiles, warps and stages are chosen,
    on the same grounds as ``fla.ops.attn.parallel_kernels.launch_config``: bf16 / fp16 with head dims <= 64 timed
    (``python -m benchmarks.ops.tune_attn``), float32 and head dims up to 128 chosen to compile for sm_90 with no or
    few register spills (``python -m benchmarks.ops.kernel_resources``), wider heads as before.

    Under the interpreter, small and unequal tiles so that tests at T <= 130 cross many tile boundaries."""
    if triton_interpreting():
        return {"fwd": (32, 16, 4, 1), "dq": (16, 32, 4, 1), "dkdv": (16, 32, 4, 1), "dkdv_sel": (16, 16, 4, 1)}[stage]
    D = max(DK, DV)
    if fp32 and D <= 128:
        if stage == "fwd":
            return 32, 64, 8, 2
        return (16, 16, 4, 2) if stage == "dkdv" and D > 64 else (16, 32, 4, 2)
    if D <= 64:
        return {"fwd": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2), "dkdv_sel": (32, 64, 4, 3), "dq": (64, 32, 4, 3)}[stage]
    if D <= 128:
        return {"fwd": (64, 64, 8, 2), "dkdv": (32, 16, 4, 2), "dkdv_sel": (32, 32, 4, 2), "dq": (32, 16, 4, 2)}[stage]
    return (64, 32, 8, 2) if stage == "fwd" else (32, 32, 8, 1)


def build_selected_index(selected: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    """selected [B, T, H] bool -> (sel [B*H, T] uint8, cnt [B*H, T+1] int32, pos [B*H, T] int32,
    eos [T] int32 or None). Torch ops on the device of ``selected``, no host synchronisation."""
    B, T, H = selected.shape
    sel = selected.permute(0, 2, 1).reshape(B * H, T)
    incl = sel.cumsum(-1, dtype=torch.int32)
    cnt = torch.nn.functional.pad(incl, (1, 0))
    # scatter each selected position to its compact slot; unselected ones land in the dummy column T
    slot = torch.where(sel, incl - 1, torch.full_like(incl, T)).long()
    pos = torch.full((B * H, T + 1), T, dtype=torch.int32, device=selected.device)
    src = torch.arange(T, dtype=torch.int32, device=selected.device).expand(B * H, T)
    pos.scatter_(1, slot, src)
    pos = pos[:, :T].contiguous()
    eos = None
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=selected.device, dtype=torch.long)
        doc = torch.searchsorted(cu[1:], torch.arange(T, device=selected.device), right=True)
        eos = cu[1:].gather(0, doc.clamp_max(cu.numel() - 2)).to(torch.int32).contiguous()
    return sel.to(torch.uint8).contiguous(), cnt.contiguous(), pos, eos


def lte_fwd(q, k, v, index, scale: float, window_size: int, cu_seqlens):
    """-> (o [B, T, HQ, V] in q.dtype, lse [B, HQ, T] float32 base 2)."""
    B, T, HQ, DK = q.shape
    H, DV = k.shape[2], v.shape[-1]
    sel, cnt, pos, _ = index
    o = torch.empty((B, T, HQ, DV), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, HQ, T), device=q.device, dtype=torch.float32)
    BM, BN, num_warps, num_stages = launch_config("fwd", DK, DV, q.dtype == torch.float32)
    BK, BV = _dims(q, v)
    n_blocks, chunk_indices = _grid_rows(cu_seqlens, T, BM)
    _lte_fwd_kernel[(n_blocks, B * HQ)](
        q, k, v, sel, cnt, pos, o, lse, cu_seqlens, chunk_indices, scale * LOG2E, T, window_size,
        HQ=HQ, H=H, G=HQ // H, DK=DK, DV=DV, BM=BM, BN=BN, BK=BK, BV=BV,
        IS_VARLEN=cu_seqlens is not None, PRECISION=_precision(q), num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse


def lte_bwd(q, k, v, o, lse, do, index, scale: float, window_size: int, cu_seqlens):
    """-> (dq, dk, dv in the input dtypes, dscore [B, T, H] float32)."""
    B, T, HQ, DK = q.shape
    H, DV = k.shape[2], v.shape[-1]
    sel, cnt, pos, eos = index
    G = HQ // H
    BK, BV = _dims(q, v)
    varlen = cu_seqlens is not None
    prec = _precision(q)
    fp32 = q.dtype == torch.float32
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dscore = torch.empty((B, T, H), device=q.device, dtype=torch.float32)

    delta = torch.empty((B, HQ, T), device=q.device, dtype=torch.float32)
    M = B * T * HQ
    BR = max(1, min(64, 4096 // BV))
    _attn_bwd_preprocess_kernel[(triton.cdiv(M, BR),)](o, do, delta, M, HQ=HQ, DV=DV, T_full=T, BR=BR, BV=BV)

    # compact partials: written for every compact entry < count, read only for those
    dkc = torch.empty((B * H, T, DK), device=q.device, dtype=torch.float32)
    dvc = torch.empty((B * H, T, DV), device=q.device, dtype=torch.float32)
    BM, BC, num_warps, num_stages = launch_config("dkdv_sel", DK, DV, fp32)
    _lte_bwd_dkdv_selected_kernel[(triton.cdiv(T, BC), B * H)](
        q, k, v, do, lse, delta, cnt, pos, eos, dkc, dvc, scale * LOG2E, T, window_size,
        HQ=HQ, H=H, G=G, DK=DK, DV=DV, BM=BM, BC=BC, BK=BK, BV=BV, IS_VARLEN=varlen, PRECISION=prec,
        num_warps=num_warps, num_stages=num_stages,
    )

    BM, BN, num_warps, num_stages = launch_config("dkdv", DK, DV, fp32)
    n_kblocks, k_chunks = _grid_rows(cu_seqlens, T, BN)
    _lte_bwd_dkdv_window_kernel[(n_kblocks, B * H)](
        q, k, v, do, lse, delta, sel, cnt, dkc, dvc, dk, dv, dscore, cu_seqlens, k_chunks,
        scale * LOG2E, scale, T, window_size,
        HQ=HQ, H=H, G=G, DK=DK, DV=DV, BM=BM, BN=BN, BK=BK, BV=BV, IS_VARLEN=varlen, PRECISION=prec,
        num_warps=num_warps, num_stages=num_stages,
    )

    BM, BN, num_warps, num_stages = launch_config("dq", DK, DV, fp32)
    n_qblocks, q_chunks = _grid_rows(cu_seqlens, T, BM)
    _lte_bwd_dq_kernel[(n_qblocks, B * HQ)](
        q, k, v, do, lse, delta, sel, cnt, pos, dq, cu_seqlens, q_chunks, scale * LOG2E, scale, T, window_size,
        HQ=HQ, H=H, G=G, DK=DK, DV=DV, BM=BM, BN=BN, BK=BK, BV=BV, IS_VARLEN=varlen, PRECISION=prec,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dv, dscore


class LTEAttnFunction(torch.autograd.Function):
    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, q, k, v, score, selected, window_size, scale, cu_seqlens):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, T, HQ, _ = q.shape
        assert HQ % k.shape[2] == 0 and selected.shape == score.shape == (B, T, k.shape[2])
        assert window_size >= 0 and (cu_seqlens is None or B == 1)
        window_size = min(int(window_size), T)  # i - j <= T - 1 always: larger windows are all the same
        if B * T == 0:
            ctx.empty = True
            ctx.save_for_backward(q, k, v, score)
            return q.new_zeros((B, T, HQ, v.shape[-1]))
        ctx.empty = False
        index = build_selected_index(selected.bool(), cu_seqlens)
        o, lse = lte_fwd(q, k, v, index, scale, window_size, cu_seqlens)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, *[t for t in index if t is not None])
        ctx.has_eos = index[3] is not None
        ctx.scale, ctx.window_size, ctx.score_dtype = scale, window_size, score.dtype
        return o

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, do):
        if ctx.empty:
            return (*(torch.zeros_like(t) for t in ctx.saved_tensors), None, None, None, None)
        q, k, v, o, lse, cu_seqlens, *index = ctx.saved_tensors
        if not ctx.has_eos:
            index.append(None)
        dq, dk, dv, dscore = lte_bwd(q, k, v, o, lse, do.contiguous(), tuple(index), ctx.scale, ctx.window_size,
                                     cu_seqlens)
        return dq, dk, dv, dscore.to(ctx.score_dtype), None, None, None, None


def lte_attn_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score: torch.Tensor, selected: torch.Tensor,
                    window_size: int, scale: float, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LTE attention through the Triton kernels (inputs validated by the caller).

    Args:
        q: [B, T, HQ, D]; k: [B, T, H, D]; v: [B, T, H, V]; one float dtype, HQ a multiple of H.
        score: [B, T, H] float router scores (only their gradient is used: straight-through gate).
        selected: [B, T, H] bool, sinks included. window_size: w >= 0 (the token plus w previous ones).
        scale: softmax scale. cu_seqlens: [N + 1] int offsets of packed documents (B = 1).

    Returns:
        o [B, T, HQ, V] in q.dtype; differentiable in q, k, v and score (d score in score.dtype).
    """
    return LTEAttnFunction.apply(q, k, v, score, selected, window_size, scale, cu_seqlens)
