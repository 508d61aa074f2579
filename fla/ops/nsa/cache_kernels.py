"""Triton kernel of ``fla.ops.nsa.cache.nsa_cache_append_one``: one new token per row into NSA's raw KV cache, and
the mean of the block it completes into the compressed cache.

One program per (row n, kv head h), for the keys and then the values:

    L     = lengths[n];  write = real[n] != 0 and 0 <= L < C;  done = write and (L + 1) % BS == 0
    cache[n, L, h]              = new[n, h]                                   (if write)
    cmp[n, (L + 1) // BS - 1, h] = (new[n, h] + sum of cache[n, L + 1 - BS .. L - 1, h]) / BS   (if done, float32)

The block's other BS - 1 tokens are loaded from the cache and the new one is taken from registers (as stored, in
the cache dtype): a load of what this program has just stored would not be ordered across its threads. Every
decision is a mask on device values: no host read, and the grid depends on shapes only (CUDA-graph capturable).
Layout: caches [N, C, H, D] and [N, NB, H, D] contiguous, new tokens [N, H, D] contiguous; offsets in int64.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fla.utils import triton_interpreting


@triton.jit
def _append_head(CACHE, CMP, NEW, i_n, i_h, L, write, done, C, NB,
                 H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr):
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_new = tl.load(NEW + (i_n * H + i_h) * D + o_d, mask=m_d, other=0.0).to(CACHE.dtype.element_ty)
    tl.store(CACHE + ((i_n * C + L) * H + i_h) * D + o_d, b_new, mask=m_d & write)

    start = L + 1 - BS  # the completed block's first token
    b_sum = b_new.to(tl.float32)
    for t0 in range(0, BS - 1, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < BS - 1
        ptr = CACHE + ((i_n * C + start + o_t[:, None]) * H + i_h) * D + o_d[None, :]
        b_blk = tl.load(ptr, mask=done & m_t[:, None] & m_d[None, :], other=0.0)
        b_sum += tl.sum(b_blk.to(tl.float32), 0)
    block = (L + 1) // BS - 1
    tl.store(CMP + ((i_n * NB + block) * H + i_h) * D + o_d, (b_sum / BS).to(CMP.dtype.element_ty),
             mask=m_d & done)


@triton.jit(do_not_specialize=["C", "NB"])  # the capacity grows: no recompile per size
def _cache_append_one_kernel(
    KC, VC, KCMP, VCMP, KN, VN, LENS, REAL, C, NB,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_REAL: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    L = tl.load(LENS + i_n).to(tl.int64)
    write = (L >= 0) & (L < C)
    if HAS_REAL:
        write = write & (tl.load(REAL + i_n) != 0)
    done = write & ((L + 1) % BS == 0)
    _append_head(KC, KCMP, KN, i_n, i_h, L, write, done, C, NB, H=H, D=DK, BD=BK, BS=BS, BT=BT)
    _append_head(VC, VCMP, VN, i_n, i_h, L, write, done, C, NB, H=H, D=DV, BD=BV, BS=BS, BT=BT)


def cache_append_one_fwd(k_cache, v_cache, k_cmp, v_cmp, k_new, v_new, lengths, real: Optional[torch.Tensor],
                         block_size: int) -> None:
    """Launch the kernel (arguments checked by ``nsa_cache_append_one``; caches contiguous, written in place)."""
    N, C, H, DK = k_cache.shape
    DV, NB = v_cache.shape[-1], k_cmp.shape[1]
    if N == 0 or C == 0 or H == 0:
        return
    if real is not None and real.dtype == torch.bool:
        real = real.view(torch.uint8)  # same bytes, a dtype every Triton version loads
    BT = min(16 if triton_interpreting() else 32, triton.next_power_of_2(max(block_size - 1, 1)))
    _cache_append_one_kernel[(N, H)](
        k_cache, v_cache, k_cmp, v_cmp, k_new.contiguous(), v_new.contiguous(), lengths.contiguous(),
        lengths if real is None else real.contiguous(), C, NB,
        H=H, DK=DK, DV=DV, BS=block_size, BT=BT, BK=triton.next_power_of_2(DK), BV=triton.next_power_of_2(DV),
        HAS_REAL=real is not None, num_warps=2,
    )
