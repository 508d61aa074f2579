"""Triton kernels of one NSA decoding step (``fla.ops.nsa.decoding.nsa_decoding_one_step``'s CUDA path).

Row n holds L = seq_lens[n] tokens (the query is the newest, at P = L - 1); its compressed blocks c < NC = L // BS
are visible, the current block is IC = P // BS. Per call, with every branch on, three launches:

A. ``_decode_cmp_kernel``, one program per (row, kv head); the G query heads of the kv head are the rows of a
   [BG, DK] query tile (BG = max(16, next power of 2 of G), padding rows masked), so every compressed block is read
   once for the group and both products are ``tl.dot``s.
   pass 1, blocks c < NC in tiles of BC: online softmax (base 2) -> o_cmp [G, V] (float32 workspace) and the
   log-sum-exp of each head;
   pass 2, blocks c <= IC: the scores again (keys only) and the ranking score of each candidate block,
   I_c = sum_g exp2(s_gc - lse_g) for c < IC, forced G / G + 1 / G + 2 for blocks 0 / IC - 1 / IC, -inf for
   c > IC, into a float32 workspace [N, H, W] (W = ceil(C / BS) columns; the tail above IC's tile set to -inf).
S. ``torch.topk(..., sorted=False)`` of the workspace: TOP = min(block_counts, W) (value, block) picks per (row, kv
   head). Exactly IC + 1 columns are finite, so the picks are distinct blocks and a -inf pick (fewer candidates
   than block_counts) is "no block"; their order does not matter (the selected branch is a softmax over a set).
B. ``_decode_attend_kernel``, one program per (row, kv head): the selected tokens (the picks' blocks, tokens
   j <= P) and the window tokens max(0, P - w + 1) .. P, each branch with its own online softmax over tiles of BT
   tokens, then o = g_cmp o_cmp + g_slc o_slc + g_swa o_swa written in q.dtype. A selected tile holds tokens of
   one block (a block larger than BT takes several tiles; a block smaller than BT >= 16 leaves the rest masked);
   the picks are loaded once, before the loop, so the pipelined loop issues no dependent load. A row with L = 0
   sees no key in any branch and writes zeros.

A branch whose gate is None is left out: without g_slc there is no pass 2 and no topk; with only the window branch
kernel A is not launched.

Bytes per program (bf16, D = V = 64, block_size 64, block_counts 16, window 512, a row at 64K tokens: NC = 1024):
kernel A reads 1024 x (128 + 128) B = 256 KB of compressed keys and values in pass 1 (8 tiles of 128 blocks) and
the 128 KB of keys again in pass 2 (8 tiles; probably L2 hits, read microseconds earlier) and writes 4 KB of
ranking scores; kernel B reads (16 x 64 selected + 512 window tokens) x 256 B = 384 KB in 16 + 8 tiles (the window
overlaps the last selected blocks: the branches are separate, both are read). Kernel A grows as context /
block_size, kernel B is constant. At B = 8, H = 2 a launch has 16 programs, one per SM on 16 of the SMs: each
kernel is latency-bound (how many bytes a program keeps in flight), not bandwidth-bound; hence the large tiles and
the three stages of ``launch_config``. Splitting pass 1 and kernel B over several programs per (row, kv head)
(flash-decoding partials and a combine) is the next step if GPU timings ask for it; it is not done here.

Inputs: q [N, 1, HQ, DK] (contiguous), caches [N, C, H, *] and compressed caches [N, NB, H, *] with any strides
along the first two dims (heads and features packed), seq_lens int32 / int64, gates [N, 1, HQ] in any float dtype
with unit stride along HQ. A 16-bit step with every tensor in q's dtype multiplies in that dtype (float32
accumulation); float32 or mixed dtypes multiply in float32 with IEEE products. Grid sizes depend on shapes only and
no device value is read on the host: the step is CUDA-graph capturable.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fla.utils import triton_interpreting

LOG2E = 1.4426950408889634


@triton.constexpr_function
def _group_rows(G):
    """Rows of the query tile: the group padded to a power of 2, at least 16 (the smallest ``tl.dot`` M)."""
    return max(16, triton.next_power_of_2(G))


@triton.constexpr_function
def _picks_width(TOP):
    """Width of the vector holding a program's picks: TOP padded to a power of 2 (at least 2)."""
    return max(2, triton.next_power_of_2(TOP))


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _online_step(b_s, b_v, b_m, b_l, b_acc, FP32: tl.constexpr):
    """One tile of an online softmax: scores b_s [BG, BT] (base 2, -inf where masked), values b_v [BT, BV]."""
    b_mnew = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - b_mnew[:, None])
    b_alpha = tl.exp2(b_m - b_mnew)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    if FP32:
        b_pv = _dot(b_p, b_v, FP32)
    else:
        b_pv = tl.dot(b_p.to(b_v.dtype), b_v)
    return b_mnew, b_l, b_acc * b_alpha[:, None] + b_pv


@triton.jit
def _attend_tile(b_q, p_kt, p_v, m_t, m_k, m_v, qk_scale, b_m, b_l, b_acc, FP32: tl.constexpr):
    """Load the keys [BK, BT] / values [BT, BV] of a token tile (m_t: tokens to attend to) and advance the online
    softmax (m, l, acc) of the query tile b_q by it."""
    b_kt = tl.load(p_kt, mask=m_k[:, None] & m_t[None, :], other=0.0)
    b_v = tl.load(p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_s = tl.where(m_t[None, :], _dot(b_q, b_kt, FP32) * qk_scale, float("-inf"))
    return _online_step(b_s, b_v, b_m, b_l, b_acc, FP32)


@triton.jit(do_not_specialize=["NB", "W"])
def _decode_cmp_kernel(
    Q, KC, VC, LENS, OC, IMP, qk_scale, NB, W,
    stride_kn, stride_kc, stride_vn, stride_vc,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_CMP: tl.constexpr, HAS_SLC: tl.constexpr, FP32: tl.constexpr,
):
    BG: tl.constexpr = _group_rows(G)
    i_nh = tl.program_id(0)
    i_n = (i_nh // H).to(tl.int64)
    i_h = i_nh % H
    o_g = tl.arange(0, BG)
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_g = o_g < G
    m_k = o_k < DK
    m_v = o_v < DV
    i_hq = i_n * HQ + i_h * G + o_g

    L = tl.load(LENS + i_n).to(tl.int32)
    nc = tl.minimum(L // BS, NB)  # visible compressed blocks (NB bounds reads on malformed lengths)
    ic = tl.maximum(L - 1, 0) // BS  # current block
    b_q = tl.load(Q + i_hq[:, None] * DK + o_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.0)

    # keys loaded transposed, [BK, BC]; the row offset (64-bit) is in the scalar base, block offsets stay 32-bit
    p_kt = KC + i_n * stride_kn + i_h * DK + o_k[:, None]
    p_v = VC + i_n * stride_vn + i_h * DV + o_v[None, :]

    # pass 1: online softmax over the visible blocks
    b_m = tl.full([BG], -1e30, dtype=tl.float32)  # finite: no inf - inf before the first visible block
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BV], dtype=tl.float32)
    for start in range(0, nc, BC):
        cols = start + o_c
        m_c = cols < nc
        b_kt = tl.load(p_kt + cols[None, :] * stride_kc, mask=m_k[:, None] & m_c[None, :], other=0.0)
        b_s = tl.where(m_c[None, :], _dot(b_q, b_kt, FP32) * qk_scale, float("-inf"))
        if HAS_CMP:
            b_v = tl.load(p_v + cols[:, None] * stride_vc, mask=m_c[:, None] & m_v[None, :], other=0.0)
            b_m, b_l, b_acc = _online_step(b_s, b_v, b_m, b_l, b_acc, FP32)
        else:  # the log-sum-exp for the ranking only
            b_mnew = tl.maximum(b_m, tl.max(b_s, 1))
            b_l = b_l * tl.exp2(b_m - b_mnew) + tl.sum(tl.exp2(b_s - b_mnew[:, None]), 1)
            b_m = b_mnew
    has = b_l > 0
    if HAS_CMP:
        b_o = b_acc / tl.where(has, b_l, 1.0)[:, None]
        tl.store(OC + i_hq[:, None] * DV + o_v[None, :], b_o, mask=m_g[:, None] & m_v[None, :])

    if HAS_SLC:
        # pass 2: ranking scores of the candidates c <= IC (every c < IC is visible, so lse is finite there)
        b_lse = tl.where(m_g & has, b_m + tl.log2(tl.where(has, b_l, 1.0)), float("inf"))  # padding rows: p = 0
        p_imp = IMP + i_nh.to(tl.int64) * W
        for start in range(0, ic + 1, BC):
            cols = start + o_c
            m_c = cols < tl.minimum(ic, nc)  # nc >= ic for well-formed lengths
            b_kt = tl.load(p_kt + cols[None, :] * stride_kc, mask=m_k[:, None] & m_c[None, :], other=0.0)
            b_p = tl.exp2(_dot(b_q, b_kt, FP32) * qk_scale - b_lse[:, None])
            b_imp = tl.sum(tl.where(m_c[None, :], b_p, 0.0), 0)
            b_imp = tl.where(cols == 0, G * 1.0, b_imp)
            b_imp = tl.where(cols == ic - 1, G + 1.0, b_imp)
            b_imp = tl.where(cols == ic, G + 2.0, b_imp)
            b_imp = tl.where(cols > ic, float("-inf"), b_imp)
            tl.store(p_imp + cols, b_imp, mask=cols < W)
        for start in range((ic + BC) // BC * BC, W, BC):  # the columns above the last tile: no candidates
            cols = start + o_c
            tl.store(p_imp + cols, tl.full([BC], float("-inf"), dtype=tl.float32), mask=cols < W)


@triton.jit(do_not_specialize=["C", "WINDOW"])
def _decode_attend_kernel(
    Q, K, Vp, LENS, OC, PICK_VAL, PICK_IDX, GC, GS, GW, O, qk_scale, C, WINDOW,
    stride_kn, stride_kc, stride_vn, stride_vc, stride_gc, stride_gs, stride_gw,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    TOP: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_CMP: tl.constexpr, HAS_SLC: tl.constexpr, HAS_SWA: tl.constexpr, FP32: tl.constexpr,
):
    BG: tl.constexpr = _group_rows(G)
    i_nh = tl.program_id(0)
    i_n = (i_nh // H).to(tl.int64)
    i_h = i_nh % H
    o_g = tl.arange(0, BG)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_g = o_g < G
    m_k = o_k < DK
    m_v = o_v < DV
    m_out = m_g[:, None] & m_v[None, :]
    i_g = i_h * G + o_g  # the group's query heads within the row
    i_hq = i_n * HQ + i_g

    L = tl.minimum(tl.load(LENS + i_n).to(tl.int32), C)  # C bounds reads on malformed lengths
    b_q = tl.load(Q + i_hq[:, None] * DK + o_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.0)
    # a tile of BT tokens from token t0: keys transposed [BK, BT] at K_row + t0 * stride_kc + off_kt, values
    # [BT, BV] at V_row + t0 * stride_vc + off_v (t0 in the 64-bit scalar, the offsets 32-bit and loop-invariant)
    K_row = K + i_n * stride_kn + i_h * DK
    V_row = Vp + i_n * stride_vn + i_h * DV
    off_kt = o_t[None, :] * stride_kc + o_k[:, None]
    off_v = o_t[:, None] * stride_vc + o_v[None, :]
    b_o = tl.zeros([BG, BV], dtype=tl.float32)

    if HAS_SLC:
        TILES: tl.constexpr = (BS + BT - 1) // BT  # tiles a block (the last one masked where BT does not divide BS)
        BP: tl.constexpr = _picks_width(TOP)
        b_m = tl.full([BG], -1e30, dtype=tl.float32)
        b_l = tl.zeros([BG], dtype=tl.float32)
        b_acc = tl.zeros([BG, BV], dtype=tl.float32)
        # the picks, loaded once: first token of each picked block, or L (no token) for a -inf pick; inside the loop
        # a pick's start is taken out of the registers (a reduction), not loaded (a load there would stall the
        # pipelined loop once per block)
        o_p = tl.arange(0, BP)
        p_pick = i_nh.to(tl.int64) * TOP + o_p
        b_val = tl.load(PICK_VAL + p_pick, mask=o_p < TOP, other=float("-inf"))
        b_blk = tl.load(PICK_IDX + p_pick, mask=o_p < TOP, other=0).to(tl.int64)
        b_first = tl.where(b_val > float("-inf"), b_blk * BS, L)
        for i in range(0, TOP * TILES):  # the picks' tokens, pick after pick
            off = (i % TILES) * BT
            t0 = tl.sum(tl.where(o_p == i // TILES, b_first, 0), 0) + off
            m_t = (off + o_t < BS) & (t0 + o_t < L)
            b_m, b_l, b_acc = _attend_tile(b_q, K_row + t0 * stride_kc + off_kt, V_row + t0 * stride_vc + off_v,
                                           m_t, m_k, m_v, qk_scale, b_m, b_l, b_acc, FP32)
        b_g = tl.load(GS + i_n * stride_gs + i_g, mask=m_g, other=0.0).to(tl.float32)
        b_o += b_acc * (b_g / tl.where(b_l > 0, b_l, 1.0))[:, None]

    if HAS_SWA:
        b_m = tl.full([BG], -1e30, dtype=tl.float32)
        b_l = tl.zeros([BG], dtype=tl.float32)
        b_acc = tl.zeros([BG, BV], dtype=tl.float32)
        lo = tl.maximum(L - WINDOW, 0)
        p_kt = K_row + lo.to(tl.int64) * stride_kc + off_kt
        p_v = V_row + lo.to(tl.int64) * stride_vc + off_v
        for start in range(lo, L, BT):
            b_m, b_l, b_acc = _attend_tile(b_q, p_kt, p_v, start + o_t < L, m_k, m_v, qk_scale, b_m, b_l, b_acc, FP32)
            p_kt += BT * stride_kc
            p_v += BT * stride_vc
        b_g = tl.load(GW + i_n * stride_gw + i_g, mask=m_g, other=0.0).to(tl.float32)
        b_o += b_acc * (b_g / tl.where(b_l > 0, b_l, 1.0))[:, None]

    if HAS_CMP:  # o_cmp of a row without a visible block is 0 (kernel A)
        b_g = tl.load(GC + i_n * stride_gc + i_g, mask=m_g, other=0.0).to(tl.float32)
        b_oc = tl.load(OC + i_hq[:, None] * DV + o_v[None, :], mask=m_out, other=0.0)
        b_o += b_oc * b_g[:, None]

    tl.store(O + i_hq[:, None] * DV + o_v[None, :], b_o.to(O.dtype.element_ty), mask=m_out)


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def launch_config(kernel: str, DK: int, DV: int, G: int, fp32: bool, block_size: int) -> Tuple[int, int, int]:
    """(tile, num_warps, num_stages) of ``kernel`` ('cmp': tile = BC compressed blocks; 'attend': tile = BT tokens).

    Few programs run per SM (one per (row, kv head)), so registers and shared memory do not limit occupancy; what
    limits a program is how many bytes it has in flight. Hence large tiles, 8 warps, three stages for 16-bit inputs
    (two for float32, whose IEEE products keep their operands in registers). BT never exceeds the block (rounded up
    to a power of 2): a selected tile holds the tokens of one block. ptxas (sm_90) reports no spills for these at
    D = 64 / 128 and G = 1 / 3 / 16 / 32 in bf16, fp16 and fp32 (but 12 bytes for fp32, D = 128, G = 32).
    """
    rows = max(16, _pow2(G))
    cost = max(DK, DV) * rows // 16 * (2 if fp32 else 1)  # 64: bf16, D = 64, G <= 16
    if kernel == "cmp":
        tile = (32 if cost <= 256 else 16) if fp32 else (128 if cost <= 64 else 64)
    else:
        tile = min(32 if fp32 else 64, max(16, _pow2(block_size)))
    return tile, 8, (2 if fp32 else 3)


@functools.lru_cache(maxsize=None)
def _meta(kernel: str, DK: int, DV: int, G: int, fp32: bool, block_size: int,
          launch: Optional[Tuple[int, int, int]], interpreting: bool) -> dict:
    """Tile, feature widths and launch keywords of ``kernel`` (cached: the step is host-bound without a graph)."""
    tile, num_warps, num_stages = launch or launch_config(kernel, DK, DV, G, fp32, block_size)
    if interpreting:  # small tiles: several of them even at tiny shapes
        tile, num_warps, num_stages = 16, 4, 1
    return {"BC" if kernel == "cmp" else "BT": tile, "BK": max(16, _pow2(DK)), "BV": max(16, _pow2(DV)),
            "num_warps": num_warps, "num_stages": num_stages}


def _rows_and_features(x: torch.Tensor) -> torch.Tensor:
    """x [N, T, H, D] with heads and features packed (the kernels step a head by D and a feature by 1)."""
    H, D = x.shape[2], x.shape[3]
    if x.stride(3) != 1 or (H > 1 and x.stride(2) != D):
        x = x.contiguous()
    return x


def _gate(g: Optional[torch.Tensor]):
    if g is not None and g.shape[2] > 1 and g.stride(2) != 1:
        g = g.contiguous()
    return g


def _prepare(q, k_cache, v_cache, k_cmp, v_cmp, seq_lens):
    q = q if q.is_contiguous() else q.contiguous()
    k_cache, v_cache, k_cmp, v_cmp = (_rows_and_features(x) for x in (k_cache, v_cache, k_cmp, v_cmp))
    if seq_lens.stride(0) != 1 and seq_lens.shape[0] > 1:
        seq_lens = seq_lens.contiguous()
    fp32 = q.dtype == torch.float32 or any(x.dtype != q.dtype for x in (k_cache, v_cache, k_cmp, v_cmp))
    return q, k_cache, v_cache, k_cmp, v_cmp, seq_lens, fp32


def compress_and_rank(q, k_cmp, v_cmp, seq_lens, num_keys: int, block_counts: int, block_size: int, scale: float,
                      fp32: bool, with_cmp: bool, with_picks: bool, launch: Optional[Tuple[int, int, int]] = None,
                      interpreting: Optional[bool] = None):
    """Kernel A (+ ``torch.topk``): (o_cmp [N, HQ, V] float32 or None, pick values and block ids [N * H, TOP] or
    None). ``num_keys``: the raw caches' capacity C (W = ceil(C / block_size) candidate columns). Inputs prepared."""
    N, _, HQ, DK = q.shape
    NB, H, DV = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    G = HQ // H
    W = -(-num_keys // block_size)  # candidate columns: every block a row of at most C tokens can be in
    sizes = [N * H * W if with_picks else 0, N * HQ * DV if with_cmp else 0]
    imp, o_cmp = torch.empty(sum(sizes), dtype=torch.float32, device=q.device).split_with_sizes(sizes)
    interpreting = triton_interpreting() if interpreting is None else interpreting
    _decode_cmp_kernel[(N * H,)](
        q, k_cmp, v_cmp, seq_lens, o_cmp, imp, scale * LOG2E, NB, W,
        k_cmp.stride(0), k_cmp.stride(1), v_cmp.stride(0), v_cmp.stride(1),
        HQ=HQ, H=H, G=G, DK=DK, DV=DV, BS=block_size, HAS_CMP=with_cmp, HAS_SLC=with_picks, FP32=fp32,
        **_meta("cmp", DK, DV, G, fp32, block_size, launch, interpreting),
    )
    picks = imp.view(N * H, W).topk(min(block_counts, W), dim=-1, sorted=False) if with_picks else (None, None)
    return (o_cmp if with_cmp else None), *picks


def nsa_decoding_fwd(q, k_cache, v_cache, k_cmp, v_cmp, seq_lens, g_cmp, g_slc, g_swa, block_counts: int,
                     block_size: int, window_size: Optional[int], scale: float,
                     cmp_launch: Optional[Tuple[int, int, int]] = None,
                     attend_launch: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """Triton path of ``nsa_decoding_one_step`` (arguments checked by it): o [N, 1, HQ, V] in q.dtype.

    Per call: one float32 workspace (ranking scores [N, H, W] and o_cmp [N, HQ, V], only the parts the gates need),
    the output, at most three launches (kernel A, ``torch.topk``, kernel B), no host read of a device value.
    ``cmp_launch`` / ``attend_launch``: (tile, num_warps, num_stages) overriding ``launch_config`` (for tuning).
    """
    N, _, HQ, DK = q.shape
    C, H, DV = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    G = HQ // H
    q, k_cache, v_cache, k_cmp, v_cmp, seq_lens, fp32 = _prepare(q, k_cache, v_cache, k_cmp, v_cmp, seq_lens)
    g_cmp, g_slc, g_swa = _gate(g_cmp), _gate(g_slc), _gate(g_swa)
    has_cmp, has_slc = g_cmp is not None, g_slc is not None
    has_swa = g_swa is not None and bool(window_size)
    o = q.new_empty((N, 1, HQ, DV))
    if N == 0 or HQ == 0 or DV == 0:
        return o
    if C == 0 or not (has_cmp or has_slc or has_swa):
        return o.zero_()
    interpreting = triton_interpreting()
    o_cmp = pick_val = pick_idx = None
    if has_cmp or has_slc:
        o_cmp, pick_val, pick_idx = compress_and_rank(q, k_cmp, v_cmp, seq_lens, C, block_counts, block_size, scale,
                                                      fp32, has_cmp, has_slc, cmp_launch, interpreting)
    dummy = seq_lens  # stands in for the pointers of branches left out (never read)
    _decode_attend_kernel[(N * H,)](
        q, k_cache, v_cache, seq_lens, o_cmp if has_cmp else dummy, pick_val if has_slc else dummy,
        pick_idx if has_slc else dummy, g_cmp if has_cmp else dummy, g_slc if has_slc else dummy,
        g_swa if has_swa else dummy, o, scale * LOG2E, C, int(window_size or 0),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        g_cmp.stride(0) if has_cmp else 0, g_slc.stride(0) if has_slc else 0, g_swa.stride(0) if has_swa else 0,
        HQ=HQ, H=H, G=G, DK=DK, DV=DV, TOP=pick_idx.shape[1] if has_slc else 1, BS=block_size,
        HAS_CMP=has_cmp, HAS_SLC=has_slc, HAS_SWA=has_swa, FP32=fp32,
        **_meta("attend", DK, DV, G, fp32, block_size, attend_launch, interpreting),
    )
    return o
