"""Tile steps shared by the flash-attention style kernels (``fla.ops.attn.parallel_kernels``,
``fla.ops.lte.parallel_kernels``): one key tile of the forward's online softmax, one tile of the dq loop and one
query tile of the dk / dv loop; the row loads (``load_kv_rows``, ``load_query_tile``) and the visibility mask
(``visible_keys``); the split of a tile loop into masked and unmasked ranges, and the range loops built from them.

Every step takes ``MASK`` (constexpr): with ``MASK=False`` the ``allowed`` argument is ignored and the step does no
``tl.where`` (interior tiles, where every pair is visible); with ``MASK=True`` pairs where ``allowed`` is false get
probability 0. Scores are base 2: ``qk_scale`` = softmax scale * log2(e), ``lse`` base 2. Dots take their operands
in the input dtype with ``PRECISION`` ('ieee' for float32 inputs, so no tf32), accumulators are float32.
Transposed operands are ``tl.trans`` of loaded tiles (never of a dot result: FLA #640).

Window ``W`` in the splits and ranges: query i sees key j when 0 <= i - j < W (the LTE kernels pass their w + 1);
with ``HAS_SEL`` a key outside the window is still visible when its ``SEL`` byte is non-zero (LTE's selected keys).

Layout of the range loops: q / do rows at ``(bos + t) * (HQ * D) + i_hq * D``, k / v rows at
``(bos + t) * (H * D) + i_h * D``; lse (base 2) and delta rows at ``lse_base + t``; ``SEL`` bytes at
``sel_base + t``. Masked ranges also mask the sequence end ``T`` (with packed sequences the next rows belong to
another document).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softmax_tile(b_q, b_k, b_v, b_mi, b_li, b_acc, allowed, qk_scale,
                 MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax. b_q [BM, K], b_k [BN, K], b_v [BN, V]; running max b_mi [BM], sum b_li
    [BM] and b_acc [BM, V] (float32) -> their updates."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    if MASK:
        b_s = tl.where(allowed, b_s, float("-inf"))
    b_mnew = tl.maximum(b_mi, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - b_mnew[:, None])
    b_alpha = tl.exp2(b_mi - b_mnew)
    b_li = b_li * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return b_mnew, b_li, b_acc


@triton.jit
def dq_tile(b_q, b_do, b_k, b_v, b_lse, b_delta, b_dq, allowed, qk_scale,
            MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of dq (unscaled): b_q [BM, K], b_do [BM, V], b_k [BN, K], b_v [BN, V], b_lse / b_delta [BM]
    -> b_dq [BM, K] + (P * (dO V^T - delta)) K."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    b_p = tl.exp2(b_s - b_lse[:, None])
    if MASK:
        b_p = tl.where(allowed, b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)


@triton.jit
def dkdv_tile(b_k, b_v, b_q, b_do, b_lse, b_delta, b_dk, b_dv, allowed, qk_scale,
              MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One query tile of dk (unscaled) and dv, in transposed form: b_k [BN, K], b_v [BN, V], b_q [BM, K],
    b_do [BM, V], b_lse / b_delta [BM], ``allowed`` [BN, BM] -> (b_dk + dS^T Q, b_dv + P^T dO)."""
    b_pt = tl.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale - b_lse[None, :])
    if MASK:
        b_pt = tl.where(allowed, b_pt, 0.0)
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
    return b_dk, b_dv


@triton.jit
def key_tile_split(t0, lo, hi, W, BM: tl.constexpr, BN: tl.constexpr, USE_WINDOW: tl.constexpr):
    """Key tiles [lo, hi) of the query tile [t0, t0 + BM) (lo a multiple of BN) -> (b, c): tiles in [lo, b) cross
    the window edge, [b, c) are wholly visible to every row of the query tile (no mask), [c, hi) cross the diagonal
    or the sequence end. Interior tiles end at or before row t0 and start at or after t0 + BM - W."""
    c = (t0 + 1) // BN * BN
    b = lo
    if USE_WINDOW:
        b = (tl.maximum(t0 + BM - W, 0) + BN - 1) // BN * BN
    b = tl.minimum(tl.maximum(b, lo), hi)
    c = tl.minimum(tl.maximum(c, b), hi)
    return b, c


@triton.jit
def query_tile_split(j0, lo, hi, T, W, BM: tl.constexpr, BN: tl.constexpr, USE_WINDOW: tl.constexpr):
    """Query tiles [lo, hi) of the key tile [j0, j0 + BN) (lo a multiple of BM) -> (b, c): [lo, b) cross the diagonal,
    [b, c) see every key of the tile and lie before the sequence end T (no mask), [c, hi) cross the window edge or
    the sequence end. Interior tiles start at or after row j0 + BN - 1 and end at or before j0 + W."""
    b = (j0 + BN - 1 + BM - 1) // BM * BM
    c = T // BM * BM
    if USE_WINDOW:
        c = tl.minimum(c, (j0 + W) // BM * BM)
    b = tl.minimum(tl.maximum(b, lo), hi)
    c = tl.minimum(tl.maximum(c, b), hi)
    return b, c


@triton.jit
def load_kv_rows(K, Vp, rows, m_rows, i_h, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, MASK: tl.constexpr):
    """Key and value rows ``rows`` (packed token indices, int64 [BN]) of kv head ``i_h``: (b_k [BN, BK],
    b_v [BN, BV]); with ``MASK`` rows where ``m_rows`` is false read as zeros (interior tiles need no row mask)."""
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV
    p_k = K + rows[:, None] * (H * DK) + i_h * DK + o_k[None, :]
    p_v = Vp + rows[:, None] * (H * DV) + i_h * DV + o_v[None, :]
    if MASK:
        b_k = tl.load(p_k, mask=m_rows[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(p_v, mask=m_rows[:, None] & m_v[None, :], other=0.0)
    else:
        b_k = tl.load(p_k, mask=m_k[None, :], other=0.0)
        b_v = tl.load(p_v, mask=m_v[None, :], other=0.0)
    return b_k, b_v


@triton.jit
def load_query_tile(Q, DO, LSE, DELTA, bos, i_hq, lse_base, o_m, T, HQ: tl.constexpr, DK: tl.constexpr,
                    DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MASK: tl.constexpr):
    """Query rows ``o_m`` of query head ``i_hq`` for the backward: (b_q [BM, BK], b_do [BM, BV], b_lse [BM],
    b_delta [BM]); rows >= T read as zeros when ``MASK``."""
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV
    if MASK:
        m_m = o_m < T
        b_q = tl.load(Q + (bos + o_m[:, None]) * (HQ * DK) + i_hq * DK + o_k[None, :],
                      mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_do = tl.load(DO + (bos + o_m[:, None]) * (HQ * DV) + i_hq * DV + o_v[None, :],
                       mask=m_m[:, None] & m_v[None, :], other=0.0)
        b_lse = tl.load(LSE + lse_base + o_m, mask=m_m, other=0.0)
        b_delta = tl.load(DELTA + lse_base + o_m, mask=m_m, other=0.0)
    else:
        b_q = tl.load(Q + (bos + o_m[:, None]) * (HQ * DK) + i_hq * DK + o_k[None, :], mask=m_k[None, :], other=0.0)
        b_do = tl.load(DO + (bos + o_m[:, None]) * (HQ * DV) + i_hq * DV + o_v[None, :], mask=m_v[None, :],
                       other=0.0)
        b_lse = tl.load(LSE + lse_base + o_m)
        b_delta = tl.load(DELTA + lse_base + o_m)
    return b_q, b_do, b_lse, b_delta


@triton.jit
def visible_keys(o_m, o_n, T, W, SEL, sel_base, USE_WINDOW: tl.constexpr, HAS_SEL: tl.constexpr):
    """[BM, BN] mask of a tile: key j (< T) is visible to query i when j <= i and (no window, i - j < W, or with
    ``HAS_SEL`` its SEL byte is non-zero)."""
    m_n = o_n < T
    allowed = (o_n[None, :] <= o_m[:, None]) & m_n[None, :]
    if USE_WINDOW:
        visible = o_m[:, None] - o_n[None, :] < W
        if HAS_SEL:
            visible = visible | (tl.load(SEL + sel_base + o_n, mask=m_n, other=0) != 0)[None, :]
        allowed = allowed & visible
    return allowed


@triton.jit
def fwd_key_range(b_q, b_mi, b_li, b_acc, K, Vp, SEL, sel_base, bos, i_h, o_m, lo, hi, T, W, qk_scale,
                  H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, MASK: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_SEL: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Online softmax of the query rows ``o_m`` over the key tiles [lo, hi) (step BN)."""
    for start in range(lo, hi, BN):
        o_n = start + tl.arange(0, BN)
        b_k, b_v = load_kv_rows(K, Vp, bos + o_n, o_n < T, i_h, H, DK, DV, BK, BV, MASK)
        if MASK:
            allowed = visible_keys(o_m, o_n, T, W, SEL, sel_base, USE_WINDOW, HAS_SEL)
            b_mi, b_li, b_acc = softmax_tile(b_q, b_k, b_v, b_mi, b_li, b_acc, allowed, qk_scale, True, PRECISION)
        else:
            b_mi, b_li, b_acc = softmax_tile(b_q, b_k, b_v, b_mi, b_li, b_acc, 0, qk_scale, False, PRECISION)
    return b_mi, b_li, b_acc


@triton.jit
def dq_key_range(b_q, b_do, b_lse, b_delta, b_dq, K, Vp, SEL, sel_base, bos, i_h, o_m, lo, hi, T, W, qk_scale,
                 H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, MASK: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_SEL: tl.constexpr,
                 PRECISION: tl.constexpr):
    """dq (unscaled) of the query rows ``o_m`` from the key tiles [lo, hi) (step BN)."""
    for start in range(lo, hi, BN):
        o_n = start + tl.arange(0, BN)
        b_k, b_v = load_kv_rows(K, Vp, bos + o_n, o_n < T, i_h, H, DK, DV, BK, BV, MASK)
        if MASK:
            allowed = visible_keys(o_m, o_n, T, W, SEL, sel_base, USE_WINDOW, HAS_SEL)
            b_dq = dq_tile(b_q, b_do, b_k, b_v, b_lse, b_delta, b_dq, allowed, qk_scale, True, PRECISION)
        else:
            b_dq = dq_tile(b_q, b_do, b_k, b_v, b_lse, b_delta, b_dq, 0, qk_scale, False, PRECISION)
    return b_dq


@triton.jit
def dkdv_query_range(b_k, b_v, b_dk, b_dv, Q, DO, LSE, DELTA, SEL, sel_base, lse_base, bos, i_hq, o_n, lo, hi, T,
                     W, qk_scale, HQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, MASK: tl.constexpr, USE_WINDOW: tl.constexpr,
                     HAS_SEL: tl.constexpr, PRECISION: tl.constexpr):
    """dk (unscaled) and dv of the key rows ``o_n`` from query head ``i_hq``'s query tiles [lo, hi) (step BM)."""
    if MASK and HAS_SEL:
        b_sel = (tl.load(SEL + sel_base + o_n, mask=o_n < T, other=0) != 0)[:, None]
    for start in range(lo, hi, BM):
        o_m = start + tl.arange(0, BM)
        b_q, b_do, b_lse, b_delta = load_query_tile(Q, DO, LSE, DELTA, bos, i_hq, lse_base, o_m, T, HQ, DK, DV, BK,
                                                    BV, MASK)
        if MASK:
            allowed = (o_n[:, None] <= o_m[None, :]) & (o_m < T)[None, :]
            if USE_WINDOW:
                visible = o_m[None, :] - o_n[:, None] < W
                if HAS_SEL:
                    visible = visible | b_sel
                allowed = allowed & visible
            b_dk, b_dv = dkdv_tile(b_k, b_v, b_q, b_do, b_lse, b_delta, b_dk, b_dv, allowed, qk_scale, True,
                                   PRECISION)
        else:
            b_dk, b_dv = dkdv_tile(b_k, b_v, b_q, b_do, b_lse, b_delta, b_dk, b_dv, 0, qk_scale, False, PRECISION)
    return b_dk, b_dv


@triton.jit
def fwd_key_tiles(b_q, b_mi, b_li, b_acc, K, Vp, SEL, sel_base, bos, i_h, o_m, t0, lo, hi, T, W, qk_scale,
                  H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_SEL: tl.constexpr,
                  PRECISION: tl.constexpr):
    """``fwd_key_range`` over the key tiles [lo, hi) of the query tile at ``t0``: tiles crossing the window edge
    (masked), interior tiles (no mask), tiles crossing the diagonal or the sequence end (masked)."""
    mid_lo, mid_hi = key_tile_split(t0, lo, hi, W, BM, BN, USE_WINDOW)
    b_mi, b_li, b_acc = fwd_key_range(b_q, b_mi, b_li, b_acc, K, Vp, SEL, sel_base, bos, i_h, o_m, lo, mid_lo, T, W,
                                      qk_scale, H, DK, DV, BN, BK, BV, True, USE_WINDOW, HAS_SEL, PRECISION)
    b_mi, b_li, b_acc = fwd_key_range(b_q, b_mi, b_li, b_acc, K, Vp, SEL, sel_base, bos, i_h, o_m, mid_lo, mid_hi, T,
                                      W, qk_scale, H, DK, DV, BN, BK, BV, False, USE_WINDOW, HAS_SEL, PRECISION)
    b_mi, b_li, b_acc = fwd_key_range(b_q, b_mi, b_li, b_acc, K, Vp, SEL, sel_base, bos, i_h, o_m, mid_hi, hi, T, W,
                                      qk_scale, H, DK, DV, BN, BK, BV, True, USE_WINDOW, HAS_SEL, PRECISION)
    return b_mi, b_li, b_acc


@triton.jit
def dq_key_tiles(b_q, b_do, b_lse, b_delta, b_dq, K, Vp, SEL, sel_base, bos, i_h, o_m, t0, lo, hi, T, W, qk_scale,
                 H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_SEL: tl.constexpr,
                 PRECISION: tl.constexpr):
    """``dq_key_range`` over the key tiles [lo, hi) of the query tile at ``t0``, split as ``fwd_key_tiles``."""
    mid_lo, mid_hi = key_tile_split(t0, lo, hi, W, BM, BN, USE_WINDOW)
    b_dq = dq_key_range(b_q, b_do, b_lse, b_delta, b_dq, K, Vp, SEL, sel_base, bos, i_h, o_m, lo, mid_lo, T, W,
                        qk_scale, H, DK, DV, BN, BK, BV, True, USE_WINDOW, HAS_SEL, PRECISION)
    b_dq = dq_key_range(b_q, b_do, b_lse, b_delta, b_dq, K, Vp, SEL, sel_base, bos, i_h, o_m, mid_lo, mid_hi, T, W,
                        qk_scale, H, DK, DV, BN, BK, BV, False, USE_WINDOW, HAS_SEL, PRECISION)
    b_dq = dq_key_range(b_q, b_do, b_lse, b_delta, b_dq, K, Vp, SEL, sel_base, bos, i_h, o_m, mid_hi, hi, T, W,
                        qk_scale, H, DK, DV, BN, BK, BV, True, USE_WINDOW, HAS_SEL, PRECISION)
    return b_dq


@triton.jit
def dkdv_query_tiles(b_k, b_v, b_dk, b_dv, Q, DO, LSE, DELTA, SEL, sel_base, lse_base, bos, i_hq, o_n, mid_lo, mid_hi,
                     lo, hi, T, W, qk_scale, HQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_SEL: tl.constexpr,
                     PRECISION: tl.constexpr):
    """``dkdv_query_range`` over query head ``i_hq``'s query tiles [lo, hi), split by ``query_tile_split``'s
    (mid_lo, mid_hi) (computed once per key tile, outside the loop over the group's heads): tiles crossing the
    diagonal (masked), interior tiles (no mask), tiles crossing the window edge or the sequence end (masked)."""
    b_dk, b_dv = dkdv_query_range(b_k, b_v, b_dk, b_dv, Q, DO, LSE, DELTA, SEL, sel_base, lse_base, bos, i_hq, o_n, lo,
                                  mid_lo, T, W, qk_scale, HQ, DK, DV, BM, BK, BV, True, USE_WINDOW, HAS_SEL, PRECISION)
    b_dk, b_dv = dkdv_query_range(b_k, b_v, b_dk, b_dv, Q, DO, LSE, DELTA, SEL, sel_base, lse_base, bos, i_hq, o_n,
                                  mid_lo, mid_hi, T, W, qk_scale, HQ, DK, DV, BM, BK, BV, False, USE_WINDOW, HAS_SEL,
                                  PRECISION)
    b_dk, b_dv = dkdv_query_range(b_k, b_v, b_dk, b_dv, Q, DO, LSE, DELTA, SEL, sel_base, lse_base, bos, i_hq, o_n,
                                  mid_hi, hi, T, W, qk_scale, HQ, DK, DV, BM, BK, BV, True, USE_WINDOW, HAS_SEL,
                                  PRECISION)
    return b_dk, b_dv
