"""Chunk bookkeeping shared by the chunked gated delta rule kernels (host side and ``@triton.jit`` side).

Every chunked kernel sees the token axis as packed rows ``[B * T, H, D]`` (a contiguous ``[B, T, H, D]`` tensor is
already that). A chunk is ``BT`` (= 64) consecutive tokens of one sequence; chunks never straddle sequences, so the
last chunk of a sequence may be short. Chunks are numbered globally: chunk ``c`` of the whole batch is

    without cu_seqlens:  sequence c // NT, chunk c % NT of it          (NT = cdiv(T, BT), every sequence length T)
    with cu_seqlens:     (sequence, chunk) = chunk_indices[c]           (``prepare_chunk_indices``)

and per-chunk tensors (the chunk-start states ``h``, their gradients ``dh``) are indexed by that global number.
Sequence ``n``'s first chunk is ``n * NT`` (or ``chunk_offsets[n]`` with cu_seqlens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fla.ops.utils.index import prepare_chunk_indices, prepare_chunk_offsets

CHUNK_SIZE = 64


@dataclass
class Chunking:
    """How a [B, T] batch (or a packed [1, T] batch with ``cu_seqlens``) is cut into chunks of ``chunk_size``."""

    B: int
    T: int
    N: int  # number of sequences (and of initial / final states)
    num_chunks: int  # chunks over all sequences
    chunk_size: int
    cu_seqlens: Optional[torch.Tensor]
    chunk_indices: Optional[torch.Tensor]  # [num_chunks, 2] (sequence, chunk in sequence), varlen only
    chunk_offsets: Optional[torch.Tensor]  # [N + 1] first chunk of each sequence, varlen only

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens is not None


def make_chunking(B: int, T: int, cu_seqlens: Optional[torch.Tensor], chunk_size: int = CHUNK_SIZE) -> Chunking:
    if cu_seqlens is None:
        return Chunking(B, T, B, B * triton.cdiv(T, chunk_size), chunk_size, None, None, None)
    chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
    chunk_offsets = prepare_chunk_offsets(cu_seqlens, chunk_size)
    return Chunking(B, T, cu_seqlens.numel() - 1, chunk_indices.shape[0], chunk_size, cu_seqlens,
                    chunk_indices.contiguous(), chunk_offsets.contiguous())


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype``: exact fp32 products for fp32 inputs (tf32 would cost
    about 1e-3 relative error); irrelevant for half-precision operands."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_stages(dtype: torch.dtype) -> int:
    """Software-pipelining depth of the per-chunk kernels: 2 for half-precision inputs, 1 for float32. Each stage
    buffers every tile a loop iteration loads (up to about 56 KB in bf16 at 64 x 64 tiles); float32 tiles are twice
    as large and deeper pipelines could overflow the 227 KB of shared memory of a Hopper SM at compile time."""
    return 2 if dtype in (torch.float16, torch.bfloat16) else 1


# (tile width along the head dims, num_warps) of each per-chunk kernel, from the launch sweep of
# ``python -m benchmarks.ops.tune_gdn`` on an H100 (bf16, B8-T4096-H8-D128 and B4-T4096-H8-D256; each stage alone):
# kkt_solve with 2 warps 0.148 ms against 0.233 with 4 (D128); wy_bwd with 8 warps 0.555 ms against 1.08 with 2
# (it spilled 3 KB per thread with 2); the others within a few percent of the best candidate. CHUNK_LAUNCH_WIDE
# overrides for head dims above 128 (dqkwg: 0.604 ms against 0.686).
# wy_bwd never takes 4 warps: with 4 warps at chunk size 64, Triton 3.4 - 3.7 on Hopper miscompile this kind of
# kernel (on an H200 with Triton 3.6 our bf16 / fp16 runs read out of bounds or gave dk with relative error 0.2;
# FLA hit the same in its delta rule WY backward, FLA #984, and bisected it to num_warps = 4). 8 warps with 32-wide
# tiles passed the GPU tests (H100); with 64-wide tiles its outputs agree with those and with 2 warps to 1e-7.
CHUNK_LAUNCH = {
    "kkt_solve": (64, 2),
    "w_u": (64, 4),
    "fwd_o": (64, 4),
    "dv_local": (64, 4),
    "dqkwg": (64, 4),
    "wy_bwd": (64, 8),
}
CHUNK_LAUNCH_WIDE = {"dqkwg": (128, 8)}
# float16 and float32 keep the settings their GPU tests passed with before that sweep (which timed bf16 only):
# 64-wide tiles, 4 warps, wy_bwd 2 warps.
CHUNK_LAUNCH_PROVEN = dict.fromkeys(CHUNK_LAUNCH, (64, 4)) | {"wy_bwd": (64, 2)}


def tuned(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` takes the launch settings tuned on the GPU (bf16) or the earlier proven ones."""
    return dtype == torch.bfloat16


def chunk_launch(kernel: str, dtype: torch.dtype, head_dim: int = 64) -> Tuple[int, dict]:
    """(block, launch options {"num_warps", "num_stages"}) of a per-chunk kernel; ``block`` is the widest tile
    along K / V (``block_k``). bf16: ``CHUNK_LAUNCH`` (and ``CHUNK_LAUNCH_WIDE`` for head dims above 128); other
    dtypes: ``CHUNK_LAUNCH_PROVEN``."""
    if not tuned(dtype):
        block, warps = CHUNK_LAUNCH_PROVEN[kernel]
    elif head_dim > 128:
        block, warps = CHUNK_LAUNCH_WIDE.get(kernel, CHUNK_LAUNCH[kernel])
    else:
        block, warps = CHUNK_LAUNCH[kernel]
    return block, {"num_warps": warps, "num_stages": num_stages(dtype)}


def block_k(K: int, block: int = 64) -> int:
    """Tile width along a head dimension of size K for a kernel whose widest tile is ``block`` (tl.dot needs at
    least 16)."""
    return max(16, min(block, triton.next_power_of_2(K)))


@triton.jit
def chunk_span(i_c, chunk_indices, cu_seqlens, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Global chunk ``i_c`` -> (first packed row of the chunk (int64), number of valid rows in it (<= BT))."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        NT = tl.cdiv(T, BT)
        i_n = (i_c // NT).to(tl.int64)
        i_t = (i_c % NT).to(tl.int64)
        bos = i_n * T
        eos = bos + T
    start = bos + i_t * BT
    n_valid = tl.minimum(eos - start, BT).to(tl.int32)
    return start, n_valid


@triton.jit
def sequence_span(i_n, cu_seqlens, chunk_offsets, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Sequence ``i_n`` -> (first packed row (int64), length, number of chunks, global index of its first chunk)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        length = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
        NT = tl.cdiv(length, BT)
        first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        length = T
        NT = tl.cdiv(T, BT)
        first_chunk = i_n.to(tl.int64) * NT
    return bos, length, NT, first_chunk
