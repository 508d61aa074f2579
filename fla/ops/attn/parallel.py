"""``parallel_attn``: causal softmax attention over whole sequences (full or sliding window, GQA, packed).

Two implementations of the same function (``fla.ops.attn.naive.naive_attn`` is the float32 truth):

- torch path (CPU, and CUDA with ``FLA_BACKEND=torch``): ``F.scaled_dot_product_attention``, with
  ``is_causal=True`` for full attention, and for a window blocks of query rows each over the keys its window
  reaches (``fla.ops.utils.sdpa.blocked_sdpa``: memory and work O(T w), not O(T^2); its backward recomputes one
  block at a time); packed sequences run separately; GQA through ``enable_gqa``; otherwise autograd by torch.
- Triton path (``fla.ops.attn.parallel_kernels``): flash-attention forward + backward kernels, the
  default on CUDA (their tests pass on an H200 with Triton 3.6).

Window convention: with ``window_size = w`` query i sees keys max(0, i - w + 1) .. i (w keys, itself included),
i.e. flash-attn's ``window_size=(w - 1, 0)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fla.ops.utils.sdpa import blocked_sdpa, query_block_rows
from fla.utils import autocast_custom_bwd, autocast_custom_fwd, check_cu_seqlens, check_qkv, check_scale, use_triton


def _check_window(window_size) -> None:
    if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int)
                                    or window_size < 1):
        raise ValueError(f"window_size must be None (full causal attention) or an integer >= 1, got {window_size!r}")


def _sdpa(q, k, v, scale: float, window_size: Optional[int], query_block: Optional[int] = None):
    """One batch of [B, T, H*, D] sequences through SDPA: causal (one call), or windowed in blocks of query rows, each
    block over only the keys its window reaches (``fla.ops.utils.sdpa``)."""
    B, T, HQ, H = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if window_size is None or window_size >= T:
        gqa = {"enable_gqa": True} if HQ != H else {}
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           scale=scale, **gqa)
        return o.transpose(1, 2)
    rows = query_block or query_block_rows(B * HQ, T)
    pos = torch.arange(T, device=q.device)

    def block_keys(a: int, b: int):
        lo = max(a - window_size + 1, 0)
        i, j = pos[a:b, None], pos[None, lo:b]
        return lo, b, None, (j <= i) & (i - j < window_size)

    return blocked_sdpa(q, k, v, scale, rows, block_keys)


def parallel_attn_torch(q, k, v, scale: float, window_size: Optional[int] = None,
                        cu_seqlens: Optional[torch.Tensor] = None, query_block: Optional[int] = None) -> torch.Tensor:
    """Torch path: SDPA with the causal / window mask. Differentiable; o in q.dtype.

    Packed sequences run one SDPA call each (memory of the largest L^2, never of the packed total: a block-diagonal
    mask over 32 packed 4K sequences would need 16 GiB). A window runs in blocks of ``query_block`` query rows
    (default ``fla.ops.utils.sdpa.query_block_rows``), each over the w - 1 + rows keys it reaches: memory and work
    O(T (w + rows)) instead of O(T^2)."""
    if cu_seqlens is None:
        return _sdpa(q, k, v, scale, window_size, query_block).contiguous()
    bounds = cu_seqlens.tolist()
    pieces = [_sdpa(q[:, s:e], k[:, s:e], v[:, s:e], scale, window_size, query_block)
              for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(pieces, 1) if pieces else q.new_zeros(*q.shape[:3], v.shape[-1])


class ParallelAttnFunction(torch.autograd.Function):
    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, q, k, v, scale, window_size, cu_seqlens):
        from fla.ops.attn.parallel_kernels import attn_fwd

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = attn_fwd(q, k, v, scale, window_size, cu_seqlens)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.scale, ctx.window_size = scale, window_size
        return o

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, do):
        from fla.ops.attn.parallel_kernels import attn_bwd

        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = attn_bwd(q, k, v, o, lse, do.contiguous(), ctx.scale, ctx.window_size, cu_seqlens)
        return dq, dk, dv, None, None, None


def parallel_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    window_size: Optional[int] = None,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> torch.Tensor:
    """Causal softmax attention.

    Args:
        q: [B, T, HQ, D]; k: [B, T, H, D]; v: [B, T, H, V], one float dtype; HQ a multiple of H (query head hq
            uses kv head hq // (HQ // H)).
        scale: default D ** -0.5.
        window_size: None (full causal) or w >= 1: query i sees keys i - w + 1 .. i.
        cu_seqlens: [N + 1] int offsets of packed sequences (then B = 1); attention never crosses a boundary.

    Returns:
        o [B, T, HQ, V] in q.dtype.

    CUDA tensors take the Triton kernels, CPU tensors the torch (SDPA) path (``FLA_BACKEND`` overrides).
    """
    check_qkv(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k and v must have the same length T={q.shape[1]} as q, got {k.shape[1]}")
    _check_window(window_size)
    check_scale(scale)
    check_cu_seqlens(cu_seqlens, q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if use_triton(q):
        return ParallelAttnFunction.apply(q, k, v, scale, window_size, cu_seqlens)
    return parallel_attn_torch(q, k, v, scale, window_size, cu_seqlens)
