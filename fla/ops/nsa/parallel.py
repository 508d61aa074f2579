"""``parallel_nsa``: Native Sparse Attention over whole sequences (or the last T_q queries of T_k keys).

Semantics: ``fla.ops.nsa.naive`` (the float32 truth). Two implementations:

- torch path (CPU; ``FLA_BACKEND=torch`` on CUDA): vectorised float32 computation per (dense batch | packed
  sequence): compressed attention over mean-pooled complete blocks, top-k block selection (non-differentiable),
  selected attention through a dense block mask by query chunks (``fla.ops.utils.sdpa.blocked_sdpa``: bounded peak
  memory, with autograd too), sliding-window attention (``fla.ops.attn.parallel_attn`` when T_q = T_k, else a masked
  softmax); gradients by autograd.
- Triton path (default on CUDA): compressed attention forward + backward and the block ranking
  (``fla.ops.nsa.compression_kernels``; mean pooling and ``torch.topk`` stay in torch), selected-block attention
  forward + backward (``fla.ops.nsa.parallel_kernels``), the window branch through ``parallel_attn``'s kernels
  (T_q = T_k; a masked softmax in torch otherwise). With the selected branch on, the branches and their gated sum are
  one autograd function (``fla.ops.nsa.fused``: no float32 branch outputs, the sum fused into the selected kernel).
  Its gpu-marked tests (``tests/ops/nsa/test_nsa_triton.py``) pass on an H200. Packed sequences run one launch set
  per sequence.
"""

from __future__ import annotations

from typing import Optional

import torch

from fla.ops.nsa.compression import blocks_to_token_mask, compression_attention, mean_pool_blocks, select_blocks
from fla.ops.nsa.naive import CuSeqlens, split_cu_seqlens
from fla.ops.utils.sdpa import blocked_sdpa
from fla.utils import check_cu_seqlens, check_positive_int, check_qkv, check_scale, check_tensor, use_triton


def _masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """q [B, T, H, G, D], k [B, S, H, D], v [B, S, H, V] (float32), mask [B, H, T, S] bool ->
    o [B, T, H, G, V]; a query without any allowed key gets 0."""
    s = torch.einsum("bthgd,bshd->bhgts", q, k) * scale
    m = mask[:, :, None]
    s = s.masked_fill(~m, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1) * m
    return torch.einsum("bhgts,bshv->bthgv", p, v)


def _window_mask(positions: torch.Tensor, num_keys: int, window_size: int) -> torch.Tensor:
    """[T, num_keys] bool: key j allowed iff P - w < j <= P."""
    j = torch.arange(num_keys, device=positions.device)
    d = positions[:, None] - j[None]
    return (d >= 0) & (d < window_size)


# the torch path's selected branch works on query chunks of at most this many score elements (HQ x rows x keys)
_SCORE_ELEMENTS_PER_CHUNK = 1 << 24


def _selected_attention_torch(qf, kf, vf, block_indices, block_size, positions, scale):
    """Selected-block attention through a dense block mask, by query chunks, each over the keys up to its last
    query (``fla.ops.utils.sdpa.blocked_sdpa``: bounded peak memory, with autograd too, and half the work of a full
    mask). qf [B, Tq, H, G, D], kf / vf [B, Tk, H, *] -> [B, Tq, H, G, V]; a query with no selected key gets 0."""
    B, Tq, H, G, D = qf.shape
    rows = max(1, _SCORE_ELEMENTS_PER_CHUNK // max(1, H * G * kf.shape[1]))
    q = qf.reshape(B, Tq, H * G, D)  # query head h * G + g reads kv head h

    def block_keys(a: int, b: int):
        keys = int(positions[b - 1]) + 1
        return 0, keys, None, blocks_to_token_mask(block_indices[:, a:b], keys, block_size, positions[a:b])

    return blocked_sdpa(q, kf, vf, scale, rows, block_keys).reshape(B, Tq, H, G, vf.shape[-1])


def _nsa_dense(q, k, v, g_cmp, g_slc, g_swa, block_counts, block_size, window_size, scale, block_indices):
    """One dense batch: q [B, Tq, HQ, D], k/v [B, Tk, H, *] with queries = the last Tq tokens."""
    B, Tq, HQ, D = q.shape
    Tk, H = k.shape[1], k.shape[2]
    G = HQ // H
    V = v.shape[-1]
    out_dtype = q.dtype
    if Tq == 0:
        return q.new_zeros(B, 0, HQ, V), (None if block_indices is not None else
                                         torch.full((B, 0, H, block_counts), -1, dtype=torch.long,
                                                    device=q.device))
    positions = torch.arange(Tq, device=q.device) + (Tk - Tq)
    triton_path = use_triton(q)
    if triton_path and g_slc is not None:
        return _nsa_dense_fused(q, k, v, g_cmp, g_slc, g_swa, block_counts, block_size, window_size, scale,
                                block_indices, positions)
    kf, vf = k.float(), v.float()
    # from here: the torch path, or the Triton path without the selected branch (no block selection needed)
    qf = q.float().reshape(B, Tq, H, G, D) if not triton_path else None  # a view for float32 inputs
    if triton_path:
        from fla.ops.nsa.compression_kernels import compression_attention_triton
        k_cmp = mean_pool_blocks(kf, block_size).to(k.dtype)
        v_cmp = mean_pool_blocks(vf, block_size).to(v.dtype)
        o_cmp = compression_attention_triton(q, k_cmp, v_cmp, Tk, block_size, scale)[0].float().view(B, Tq, H, G, V)
    else:
        k_cmp, v_cmp = mean_pool_blocks(kf, block_size), mean_pool_blocks(vf, block_size)
        o_cmp, probs = compression_attention(qf, k_cmp, v_cmp, (positions + 1) // block_size, scale)
        if block_indices is None:
            block_indices = select_blocks(probs, positions // block_size, (Tk + block_size - 1) // block_size,
                                          block_counts)
    o = 0
    if g_cmp is not None:
        o = o + o_cmp * g_cmp.float().view(B, Tq, H, G, 1)
    if g_slc is not None:
        o_slc = _selected_attention_torch(qf, kf, vf, block_indices, block_size, positions, scale)
        o = o + o_slc * g_slc.float().view(B, Tq, H, G, 1)
    if g_swa is not None and window_size:
        o_swa = _window_branch(q, k, v, window_size, scale, positions).float().view(B, Tq, H, G, V)
        o = o + o_swa * g_swa.float().view(B, Tq, H, G, 1)
    if not isinstance(o, torch.Tensor):
        o = kf.new_zeros(B, Tq, H, G, V)
    return o.reshape(B, Tq, HQ, V).to(out_dtype), block_indices


def _window_branch(q, k, v, window_size, scale, positions):
    """The window branch's output [B, T_q, HQ, V]: ``parallel_attn`` when T_q = T_k, else a masked softmax over the
    keys any query's window reaches (float32)."""
    B, Tq, HQ, D = q.shape
    Tk, H = k.shape[1], k.shape[2]
    if Tq == Tk:
        from fla.ops.attn import parallel_attn
        return parallel_attn(q, k, v, scale=scale, window_size=window_size)
    lo = max(0, Tk - Tq - window_size + 1)  # the earliest key any query's window reaches
    mask = _window_mask(positions - lo, Tk - lo, window_size)[None, None].expand(B, H, Tq, Tk - lo)
    o = _masked_softmax_attention(q.float().reshape(B, Tq, H, HQ // H, D), k[:, lo:].float(), v[:, lo:].float(),
                                  mask, scale)
    return o.reshape(B, Tq, HQ, -1)


def _nsa_dense_fused(q, k, v, g_cmp, g_slc, g_swa, block_counts, block_size, window_size, scale, block_indices,
                     positions):
    """The Triton path with the selected branch on (``fla.ops.nsa.fused``): one autograd function for the compressed
    and selected branches and the gated sum; the window branch's output is one of its inputs."""
    from fla.ops.nsa.fused import nsa_fused
    o_swa = None
    if g_swa is not None and window_size:
        o_swa = _window_branch(q, k, v, window_size, scale, positions)
    else:
        g_swa = None
    return nsa_fused(q, k, v, g_cmp, g_slc, g_swa, o_swa, block_counts, block_size, scale, block_indices)


def _check_gate(name, g, q):
    if g is not None:
        check_tensor(name, g, ndim=3, shape=list(q.shape[:3]), device=q.device)


def parallel_nsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cmp: Optional[torch.Tensor] = None,
    g_slc: Optional[torch.Tensor] = None,
    g_swa: Optional[torch.Tensor] = None,
    block_counts: int = 16,
    block_size: int = 64,
    window_size: Optional[int] = 512,
    scale: Optional[float] = None,
    cu_seqlens: CuSeqlens = None,
    block_indices: Optional[torch.Tensor] = None,
    return_block_indices: bool = False,
):
    """Native Sparse Attention (compressed + selected + sliding-window branches, gated sum).

    Args:
        q: [B, T_q, HQ, D]; k: [B, T_k, H, D]; v: [B, T_k, H, V]; one float dtype; HQ a multiple of H (any group
            size); T_q <= T_k: the queries are the **last** T_q tokens of the key sequence (chunked prefill,
            one-token decoding).
        g_cmp, g_slc, g_swa: [B, T_q, HQ] gates of the compressed, selected and window branches (None: the branch
            is left out of the sum).
        block_counts: S >= 1 selected blocks per query and kv head (blocks 0, IC - 1, IC always among them when
            S >= 3). block_size: BS >= 1 tokens per block (also the compression stride).
        window_size: w keys per query for the window branch, itself included; 0 or None: no window branch.
        scale: default D ** -0.5.
        cu_seqlens: packed sequences with B = 1: an int tensor [N + 1] (T_q = T_k) or a pair (cu_q, cu_k) of
            [N + 1] offsets, sequence n's queries being the last cu_q-length of its cu_k-length keys.
        block_indices: [B, T_q, H, S'] int block ids (-1 = none) to use instead of the top-k selection.
        return_block_indices: also return the block indices used ([B, T_q, H, S], ascending, -1 padded).

    Returns:
        o [B, T_q, HQ, V] in q.dtype (and the block indices when asked). Differentiable in q, k, v and the gates.
    """
    check_qkv(q, k, v, time_dim_name="T_k")
    B, Tq, HQ, D = q.shape
    H = k.shape[2]
    if Tq > k.shape[1]:
        raise ValueError(f"q has T_q={Tq} tokens but k only T_k={k.shape[1]}; queries are the last T_q keys' tokens")
    check_positive_int("block_counts", block_counts)
    check_positive_int("block_size", block_size)
    if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int)
                                    or window_size < 0):
        raise ValueError(f"window_size must be None, 0 (no window branch) or an int >= 1, got {window_size!r}")
    if window_size and g_swa is None:
        raise ValueError(f"window_size={window_size} asks for the window branch, but g_swa is None (pass its gate, "
                         "or window_size=0)")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        _check_gate(name, g, q)
    check_scale(scale)
    scale = D ** -0.5 if scale is None else float(scale)
    cu_q, cu_k = split_cu_seqlens(cu_seqlens)
    if cu_q is not None:
        check_cu_seqlens(cu_q, q, "cu_seqlens (queries)")
        check_cu_seqlens(cu_k, k, "cu_seqlens (keys)")
        if cu_q.numel() != cu_k.numel():
            raise ValueError(f"cu_seqlens of queries ({cu_q.numel()}) and keys ({cu_k.numel()}) must describe the "
                             "same number of sequences")
        if bool(((cu_q[1:] - cu_q[:-1]) > (cu_k[1:] - cu_k[:-1])).any()):
            raise ValueError("every packed sequence must have at most as many queries as keys (cu_seqlens pair)")
    if block_indices is not None:
        check_tensor("block_indices", block_indices, ndim=4, dtype=(torch.int32, torch.int64), device=q.device)
        if list(block_indices.shape[:3]) != [B, Tq, H]:
            raise ValueError(f"block_indices must have shape [B={B}, T_q={Tq}, H={H}, S], "
                             f"got {list(block_indices.shape)}")

    if cu_q is None:
        o, idx = _nsa_dense(q, k, v, g_cmp, g_slc, g_swa, block_counts, block_size, window_size, scale,
                            block_indices)
    else:
        bq, bk = cu_q.tolist(), cu_k.tolist()
        outs, idxs = [], []
        for n in range(len(bq) - 1):
            sq, sk = slice(bq[n], bq[n + 1]), slice(bk[n], bk[n + 1])
            gate = [None if g is None else g[:, sq] for g in (g_cmp, g_slc, g_swa)]
            bi = None if block_indices is None else block_indices[:, sq]
            o_n, i_n = _nsa_dense(q[:, sq], k[:, sk], v[:, sk], *gate, block_counts, block_size, window_size,
                                  scale, bi)
            outs.append(o_n)
            idxs.append(i_n)
        o = torch.cat(outs, 1) if outs else q.new_zeros(1, 0, HQ, v.shape[-1])
        idx = None
        if return_block_indices:
            width = max([i.shape[-1] for i in idxs], default=block_counts)
            idx = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[-1]), value=-1) for i in idxs], 1)
    if return_block_indices:
        return o, idx
    return o
