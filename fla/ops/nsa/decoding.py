"""One NSA decoding step against a start-aligned KV cache and an incrementally kept compressed cache.

Per step and kv head the cost is O(NB) for the compressed attention and the block ranking (NB = complete blocks)
plus O(S BS + w) for the selected and window keys, which are gathered, never scanned: the raw history is not
re-pooled (``fla.ops.nsa.compression.append_compressed_blocks`` pools a block once, when it completes).

Two implementations of one definition (``fla.ops.nsa.naive`` is the float32 truth):

- torch path (CPU; ``FLA_BACKEND=torch`` on CUDA): ``nsa_decoding_one_step_torch``, float32, about a hundred small
  torch ops (host-bound on a GPU);
- Triton path (default on CUDA; ``fla.ops.nsa.decoding_kernels``): compressed attention + block ranking in one kernel,
  ``torch.topk``, selected + window attention and the gated sum in a second kernel; no host read of a device value
  (CUDA-graph capturable). Its gpu-marked tests (``tests/ops/nsa/test_nsa_decoding_triton.py``) pass on an H200.
"""

from __future__ import annotations

from typing import Optional

import torch

from fla.ops.nsa.compression import compression_attention, select_blocks
from fla.utils import FLOAT_DTYPES, check_positive_int, check_scale, check_tensor, use_triton


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [N, C, H, D], index [N, H, L] (time positions per kv head, clamped into range) -> [N, H, L, D]."""
    N, C, H, D = x.shape
    xt = x.permute(0, 2, 1, 3)  # [N, H, C, D]
    return torch.gather(xt, 2, index[..., None].expand(*index.shape, D))


def _attend(q, k, v, valid, scale):
    """q [N, H, G, D], k [N, H, L, D], v [N, H, L, V], valid [N, H, L] -> [N, H, G, V] (0 without keys)."""
    s = torch.einsum("nhgd,nhld->nhgl", q, k) * scale
    m = valid[:, :, None]
    s = s.masked_fill(~m, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1) * m
    return torch.einsum("nhgl,nhlv->nhgv", p, v)


def nsa_decoding_one_step_torch(q, k_cache, v_cache, k_cmp, v_cmp, seq_lens, g_cmp, g_slc, g_swa,
                                block_counts: int, block_size: int, window_size: Optional[int],
                                scale: float) -> torch.Tensor:
    """Torch path of ``nsa_decoding_one_step`` (arguments checked by it, ``scale`` resolved)."""
    N, _, HQ, D = q.shape
    H = k_cache.shape[2]
    G = HQ // H
    C = k_cache.shape[1]
    NB = k_cmp.shape[1]
    V = v_cache.shape[-1]

    lens = seq_lens.long()
    P = (lens - 1).clamp(min=0)
    has_token = lens > 0
    qf = q.float().view(N, H, G, D)
    o_cmp, probs = compression_attention(qf[:, None], k_cmp.float(), v_cmp.float(), (lens // block_size)[:, None],
                                         scale)  # [N, 1, H, G, V], [N, H, G, 1, NB]
    o = 0
    if g_cmp is not None:
        o = o + o_cmp[:, 0] * g_cmp.float().view(N, H, G, 1)
    if g_slc is not None:
        ic = (P // block_size)[:, None]  # [N, 1]
        idx = select_blocks(probs, ic, max(NB, (C + block_size - 1) // block_size), block_counts)[:, 0]  # [N, H, S]
        tok = idx[..., None] * block_size + torch.arange(block_size, device=q.device)  # [N, H, S, BS]
        tok = tok.flatten(-2)
        valid = (idx[..., None] >= 0).expand(*idx.shape, block_size).flatten(-2) & (tok <= P[:, None, None])
        valid = valid & has_token[:, None, None]
        tok = tok.clamp(0, max(C - 1, 0))
        o_slc = _attend(qf, _gather_time(k_cache, tok).float(), _gather_time(v_cache, tok).float(), valid, scale)
        o = o + o_slc * g_slc.float().view(N, H, G, 1)
    if g_swa is not None and window_size:
        w = min(window_size, C)
        tok = P[:, None] - (w - 1) + torch.arange(w, device=q.device)  # [N, w]
        valid = (tok >= 0) & has_token[:, None]
        tok = tok.clamp(0, max(C - 1, 0))[:, None].expand(N, H, w)
        valid = valid[:, None].expand(N, H, w)
        o_swa = _attend(qf, _gather_time(k_cache, tok).float(), _gather_time(v_cache, tok).float(), valid, scale)
        o = o + o_swa * g_swa.float().view(N, H, G, 1)
    if not isinstance(o, torch.Tensor):
        o = qf.new_zeros(N, H, G, V)
    o = o * has_token[:, None, None, None]
    return o.reshape(N, 1, HQ, V).to(q.dtype)


def nsa_decoding_one_step(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    seq_lens: torch.Tensor,
    g_cmp: Optional[torch.Tensor] = None,
    g_slc: Optional[torch.Tensor] = None,
    g_swa: Optional[torch.Tensor] = None,
    block_counts: int = 16,
    block_size: int = 64,
    window_size: Optional[int] = 512,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """NSA output of the newest token of each row, the same function as ``parallel_nsa``'s last query.

    Args:
        q: [N, 1, HQ, D], the newest token of each row (its key and value are already in the cache).
        k_cache, v_cache: [N, C, H, D] / [N, C, H, V] start-aligned caches: row n's tokens are 0 .. seq_lens[n] - 1.
        k_cmp, v_cmp: [N, NB, H, D] / [N, NB, H, V] mean-pooled blocks: block c of row n valid for
            c < seq_lens[n] // block_size (the block the newest token completes included); NB * block_size >= C.
        seq_lens: [N] int, tokens in each row including the newest (the query sits at position seq_lens - 1);
            a row with 0 tokens gets a zero output.
        g_cmp, g_slc, g_swa: [N, 1, HQ] gates (None: branch left out). block_counts, block_size, window_size and
            scale as in ``parallel_nsa``.

    Returns:
        o [N, 1, HQ, V] in q.dtype.
    """
    check_tensor("q", q, ndim=4, dtype=FLOAT_DTYPES)
    N, one, HQ, D = q.shape
    if one != 1:
        raise ValueError(f"q must hold one token per row [N, 1, HQ, D], got {list(q.shape)}")
    check_tensor("k_cache", k_cache, ndim=4, device=q.device)
    check_tensor("v_cache", v_cache, ndim=4, device=q.device)
    check_tensor("k_cmp", k_cmp, ndim=4, device=q.device)
    check_tensor("v_cmp", v_cmp, ndim=4, device=q.device)
    check_tensor("seq_lens", seq_lens, ndim=1, shape=[N], dtype=(torch.int32, torch.int64), device=q.device)
    check_positive_int("block_counts", block_counts)
    check_positive_int("block_size", block_size)
    if window_size is not None:
        check_positive_int("window_size", window_size, minimum=0)
    H = k_cache.shape[2]
    if HQ % H:
        raise ValueError(f"HQ={HQ} query heads must be a multiple of H={H} kv heads")
    if window_size and g_swa is None:
        raise ValueError(f"window_size={window_size} asks for the window branch, but g_swa is None")
    for name, x, last in (("k_cache", k_cache, D), ("k_cmp", k_cmp, D), ("v_cmp", v_cmp, v_cache.shape[-1])):
        if x.shape[0] != N or x.shape[2] != H or x.shape[3] != last:
            raise ValueError(f"{name} must be [N={N}, *, H={H}, {last}] like the caches, got {list(x.shape)}")
    if v_cache.shape[:3] != k_cache.shape[:3] or k_cmp.shape[1] != v_cmp.shape[1]:
        raise ValueError(f"v_cache {list(v_cache.shape)} / v_cmp {list(v_cmp.shape)} must match k_cache "
                         f"{list(k_cache.shape)} / k_cmp {list(k_cmp.shape)} but for the last dim")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        if g is not None:
            check_tensor(name, g, ndim=3, shape=[N, 1, HQ], dtype=FLOAT_DTYPES, device=q.device)
    check_scale(scale)
    scale = D ** -0.5 if scale is None else float(scale)
    if use_triton(q):
        from fla.ops.nsa.decoding_kernels import nsa_decoding_fwd

        return nsa_decoding_fwd(q, k_cache, v_cache, k_cmp, v_cmp, seq_lens, g_cmp, g_slc, g_swa, block_counts,
                                block_size, window_size, scale)
    return nsa_decoding_one_step_torch(q, k_cache, v_cache, k_cmp, v_cmp, seq_lens, g_cmp, g_slc, g_swa,
                                       block_counts, block_size, window_size, scale)
