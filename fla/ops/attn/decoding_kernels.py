"""Triton kernels of one decoding step of causal softmax attention against a left-padded KV cache (split-K, as in
flash-decoding).

Row b's query head hq attends to keys ``max(seq_start[b], S - window) .. S - 1`` of kv head ``hq // G``; with a
``valid`` [B, S, H] mask (LTE's decode step, ``fla.ops.lte.decoding_kernels``, which passes no seq_start and no
window) only to the keys s with ``valid[b, s, hq // G]``. The cache range that any row can see (the last
``span = min(S, window)`` positions) is cut into NS splits of SPLIT keys:

1. ``_attn_decoding_split_kernel``, one program per (row, kv head, split): the G query heads of the kv head are the
   rows of a [BG, DK] query tile (BG = max(16, next power of 2 of G); rows beyond G are masked loads, never stored),
   so each [BS, DK] key and [BS, DV] value block is loaded once for the whole group and both products are
   ``tl.dot``s on tensor cores. Online softmax in float32, base 2 (the log2(e) factor is folded into the scale).
   With NS > 1 the partial (max m, sum l, unnormalised acc [DV]) of each query head goes to a float32 workspace;
   with NS = 1 (no workspace passed) the program normalises and writes o itself, and no second launch follows.
   An invalid slot (``HAS_VALID``) is a masked key: its K / V bytes are not read and its logit is -inf. Without a
   mask the ``HAS_VALID`` branches are not compiled, so plain attention pays nothing for them.
2. ``_attn_decoding_combine_kernel``, one program per (row, query head), only when NS > 1: merges the NS partials,
   o = sum_j 2^(m_j - M) acc_j / sum_j 2^(m_j - M) l_j (zeros for a row with no valid key).

Why one code path for every group size, G = 1 included: the step is memory bound. At G = 1 fifteen of the sixteen
query rows are padding, so the tensor-core products and the [16, BS] softmax do 16x the arithmetic a vector path
would, but that is still about a tenth of the time the same SM spends waiting for its K/V bytes (bf16, D = 64: a
64-key block is 16 KB, about 750 cycles of one SM's share of HBM bandwidth, against about 64 cycles of exp2 for
16 x 64 scores and a few dozen mma instructions). A vector path would save nothing measurable and would need its own
tests; for G > 1 the group tile is what removes the G-fold re-reading of the cache.

Split count: programs = B * H * NS is aimed at about 3 per SM (``_PROGRAMS_PER_SM``; 2 to 4 after rounding), all
of them resident at once, so the loads of every SM's programs overlap; a split never holds fewer than
``_MIN_SPLIT_KEYS`` keys (two 64-key blocks), so only caches and windows under 256 keys take the single-launch path.
Measured on an H200 (bf16, D64, CUDA-graph replay, 2026-11-28): at B8-HQ16-H16 the three splits that the SM count
gives beat one split by 12% at 1,281 keys and by 35% at 65,536; at B1 (16 programs) sixteen splits of a 4,096-key
cache take 14.5 us against 20.3 us for four; the LTE step's 1,281 slots at B8 take 24 us in three splits against
36 us in one. The combine launch (about 1.3 us) is smaller than what the extra programs gain in every case measured.

q [B, 1, HQ, DK] (contiguous), caches k [B, S, H, DK], v [B, S, H, DV] (any strides along B and S; heads and
features contiguous: other layouts are copied by the launcher), valid [B, S, H] bool (any strides, read as a uint8
view). float32 inputs use IEEE products (no TF32). Grid sizes depend on shapes only: no host sync, CUDA-graph
capturable.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from fla.utils import triton_interpreting

_PROGRAMS_PER_SM = 3  # split programs aimed at per SM (see the module docstring)
_MIN_SPLIT_KEYS = 128  # fewer keys a split: the combine launch costs more than the parallelism gains


@triton.constexpr_function
def _group_rows(G):
    """Rows of the query tile: the group padded to a power of 2, at least 16 (the smallest ``tl.dot`` M)."""
    return max(16, triton.next_power_of_2(G))


@triton.jit(do_not_specialize=["S", "WINDOW", "SPLIT"])
def _attn_decoding_split_kernel(
    Q, K, Vp, O, M_ws, L_ws, ACC_ws, seq_start, VALID, scale, S, WINDOW, SPLIT,
    stride_kb, stride_ks, stride_vb, stride_vs, stride_mb, stride_ms, stride_mh,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_START: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_VALID: tl.constexpr,
):
    BG: tl.constexpr = _group_rows(G)
    i_bh = tl.program_id(0)
    i_sp = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    o_g = tl.arange(0, BG)
    o_s = tl.arange(0, BS)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_g = o_g < G
    m_k = o_k < DK
    m_v = o_v < DV
    i_hq = i_b * HQ + i_h * G + o_g  # the group's query heads, row-major over [B, HQ]

    b_q = tl.load(Q + i_hq[:, None] * DK + o_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634  # scores in base 2: exp(x) = exp2(x * log2(e))

    # this program's keys: its split of the visible range, cut at the row's first valid key
    if USE_WINDOW:
        lo = tl.maximum(S - WINDOW, 0) + i_sp * SPLIT
    else:
        lo = i_sp * SPLIT
    hi = tl.minimum(lo + SPLIT, S)
    if HAS_START:
        lo = tl.maximum(lo, tl.load(seq_start + i_b).to(tl.int32))

    b_m = tl.full([BG], -1e30, dtype=tl.float32)  # finite start: no inf - inf for rows that see no key yet
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BV], dtype=tl.float32)
    # keys loaded transposed, [BK, BS], so the score product needs no tl.trans; the 64-bit part of the address is
    # in the scalar base, the per-element offsets (< BS * stride) stay 32-bit
    p_kt = K + i_b * stride_kb + lo.to(tl.int64) * stride_ks + i_h * DK + o_s[None, :] * stride_ks + o_k[:, None]
    p_v = Vp + i_b * stride_vb + lo.to(tl.int64) * stride_vs + i_h * DV + o_s[:, None] * stride_vs + o_v[None, :]
    if HAS_VALID:
        p_ok = VALID + i_b * stride_mb + lo.to(tl.int64) * stride_ms + i_h * stride_mh + o_s * stride_ms
    for start in range(lo, hi, BS):
        m_s = start + o_s < hi
        if HAS_VALID:  # an invalid slot is a masked key: no K / V bytes read, -inf logit
            m_s = m_s & (tl.load(p_ok, mask=m_s, other=0) != 0)
            p_ok += BS * stride_ms
        b_kt = tl.load(p_kt, mask=m_k[:, None] & m_s[None, :], other=0.0)
        b_v = tl.load(p_v, mask=m_s[:, None] & m_v[None, :], other=0.0)
        if Q.dtype.element_ty == tl.float32:
            b_s = tl.dot(b_q, b_kt, input_precision="ieee")
        else:
            b_s = tl.dot(b_q, b_kt)
        b_s = tl.where(m_s[None, :], b_s * qk_scale, float("-inf"))
        b_mnew = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mnew[:, None])
        b_alpha = tl.exp2(b_m - b_mnew)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if Q.dtype.element_ty == tl.float32:
            b_pv = tl.dot(b_p, b_v, input_precision="ieee")
        else:
            b_pv = tl.dot(b_p.to(b_v.dtype), b_v)
        b_acc = b_acc * b_alpha[:, None] + b_pv
        b_m = b_mnew
        p_kt += BS * stride_ks
        p_v += BS * stride_vs

    m_out = m_g[:, None] & m_v[None, :]
    if M_ws is None:  # one split covers the visible range: o directly (zeros for a row without keys)
        b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
        tl.store(O + i_hq[:, None] * DV + o_v[None, :], b_o.to(O.dtype.element_ty), mask=m_out)
    else:
        i_ws = i_hq * tl.num_programs(1) + i_sp
        tl.store(M_ws + i_ws, b_m, mask=m_g)
        tl.store(L_ws + i_ws, b_l, mask=m_g)
        tl.store(ACC_ws + i_ws[:, None] * DV + o_v[None, :], b_acc, mask=m_out)


@triton.jit
def _attn_decoding_combine_kernel(M_ws, L_ws, ACC_ws, O, NS, DV: tl.constexpr, BNS: tl.constexpr, BV: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    o_j = tl.arange(0, BNS)
    o_v = tl.arange(0, BV)
    m_j = o_j < NS
    m_v = o_v < DV
    b_m = tl.load(M_ws + i_bh * NS + o_j, mask=m_j, other=-1e30)
    b_l = tl.load(L_ws + i_bh * NS + o_j, mask=m_j, other=0.0)
    b_acc = tl.load(ACC_ws + (i_bh * NS + o_j[:, None]) * DV + o_v[None, :], mask=m_j[:, None] & m_v[None, :],
                    other=0.0)
    b_w = tl.exp2(b_m - tl.max(b_m, 0))
    b_w = tl.where(m_j, b_w, 0.0)
    b_lsum = tl.sum(b_l * b_w, 0)
    b_o = tl.sum(b_acc * b_w[:, None], 0) / tl.where(b_lsum > 0, b_lsum, 1.0)
    tl.store(O + i_bh * DV + o_v, b_o.to(O.dtype.element_ty), mask=m_v)


def _cdiv(a: int, b: int) -> int:  # host-side ints (triton.cdiv and next_power_of_2 cost about 1 us a call)
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (queried once per device; 4 off CUDA, for the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=None)
def _tiles(BK: int, BV: int, G: int, fp32: bool, interpreting: bool):
    """(BS keys a block, num_warps, num_stages) of the split kernel; no spills on sm_90 in any of these cases.

    bf16 / fp16: [64, D] K and V blocks for D <= 128 (at D = 64 three stages are 36 KB of shared memory and 71 to 96
    registers a thread, so several programs fit an SM), [32, D] for D = 256. float32 (IEEE products on CUDA cores,
    operands in registers) also shrinks the block with the group tile, and takes 8 warps for the largest tiles.
    """
    if interpreting:
        return 16, 4, 1
    cost = max(BK, BV) * (2 * _group_rows(G) // 16 if fp32 else 1)
    BS = 64 if cost <= 128 else (32 if cost <= 256 else 16)
    return BS, 8 if cost > 512 else 4, 3 if cost <= 128 else 2


def _split_keys(device: torch.device, span: int, programs: int, BS: int, num_splits: Optional[int]) -> int:
    """Keys per split program (a multiple of BS); ``num_splits`` forces about that many splits."""
    if num_splits is None:
        if triton_interpreting():
            min_keys, sms = 2 * BS, 4  # several splits even at tiny S
        else:
            min_keys, sms = _MIN_SPLIT_KEYS, _num_sms(device)
        num_splits = min((_PROGRAMS_PER_SM * sms + programs // 2) // programs, span // min_keys)
    num_splits = max(1, num_splits)
    return _cdiv(_cdiv(span, num_splits), BS) * BS


def attn_decoding_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window_size: Optional[int],
                      seq_start: Optional[torch.Tensor], valid: Optional[torch.Tensor] = None,
                      _num_splits: Optional[int] = None) -> torch.Tensor:
    """The launcher of both decode steps, softmax attention (``fla.ops.attn.decoding``) and LTE
    (``fla.ops.lte.decoding_kernels``).

    q [B, 1, HQ, DK], k [B, S, H, DK], v [B, S, H, DV] -> o [B, 1, HQ, DV] in q.dtype (arguments checked by the
    caller). ``seq_start``: None or [B] int32 / int64, read by the kernel in its own dtype. ``valid``: None or
    [B, S, H] bool, any strides (never copied); a (row, query head) with no valid visible key gets zeros.

    Per call: one allocation for o (plus one float32 workspace when NS > 1), a few integer operations, one launch
    (two when NS > 1). ``_num_splits`` (tests) forces about that many splits; 1 is the single-launch path.
    """
    B, _, HQ, DK = q.shape
    S, H, DV = k.shape[1], k.shape[2], v.shape[3]
    if not q.is_contiguous():
        q = q.contiguous()
    if k.stride(3) != 1 or (H > 1 and k.stride(2) != DK):  # the kernel steps heads by DK and features by 1
        k = k.contiguous()
    if v.stride(3) != 1 or (H > 1 and v.stride(2) != DV):
        v = v.contiguous()
    if seq_start is not None and B > 1 and seq_start.stride(0) != 1:
        seq_start = seq_start.contiguous()
    valid_strides = (0, 0, 0) if valid is None else valid.stride()
    if valid is not None:
        valid = valid.view(torch.uint8)
    o = q.new_empty((B, 1, HQ, DV))
    if B == 0 or HQ == 0 or DV == 0:
        return o
    if S == 0:
        return o.zero_()
    span = S if window_size is None else min(S, window_size)  # the cache positions any row can see
    BK, BV = max(16, _pow2(DK)), max(16, _pow2(DV))
    BS, num_warps, num_stages = _tiles(BK, BV, HQ // H, q.dtype == torch.float32, triton_interpreting())
    split = _split_keys(q.device, span, B * H, BS, _num_splits)
    NS = _cdiv(span, split)
    if NS == 1:  # no workspace: the split kernel writes o
        m_ws = l_ws = acc_ws = None
    else:  # one workspace, three views: m [B*HQ*NS], l [B*HQ*NS], acc [B*HQ*NS, DV]
        n = B * HQ * NS
        ws = torch.empty(n * (DV + 2), device=q.device, dtype=torch.float32)
        m_ws, l_ws, acc_ws = ws.split_with_sizes([n, n, n * DV])
    _attn_decoding_split_kernel[(B * H, NS)](
        q, k, v, o, m_ws, l_ws, acc_ws, seq_start, valid, scale, S, window_size or 0, split,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *valid_strides,
        HQ=HQ, H=H, G=HQ // H, DK=DK, DV=DV, BS=BS, BK=BK, BV=BV,
        HAS_START=seq_start is not None, USE_WINDOW=window_size is not None, HAS_VALID=valid is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    if NS > 1:
        _attn_decoding_combine_kernel[(B * HQ,)](
            m_ws, l_ws, acc_ws, o, NS, DV=DV, BNS=max(2, _pow2(NS)), BV=BV, num_warps=4)
    return o
