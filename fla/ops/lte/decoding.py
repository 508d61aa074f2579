"""``lte_decoding_one_step``: one new query per sequence against an LTE cache (ring + buffer, ``fla.ops.lte.cache``).

Query head hq of row b attends, without causal mask (RoPE is in the keys), to every slot s of kv head
h = hq // (HQ / H) with ``valid[b, s, h]``; slot order is irrelevant. A (row, head) with no valid slot returns 0.

Shapes: q [B, 1, HQ, D]; k_cache [B, S, H, D], v_cache [B, S, H, V] (q's dtype); valid [B, S, H] bool;
o [B, 1, HQ, V] in q.dtype. S = window_size + 1 + buffer_size.

Three implementations:
- ``naive_lte_decoding``: float32, heads repeated, the truth for tests;
- torch path (CPU, and CUDA with ``FLA_BACKEND=torch``): float32 softmax with GQA as [B, H, G] groups (no repeat
  of the cache);
- Triton path (``fla.ops.lte.decoding_kernels``): the softmax-attention decode kernel
  (``fla.ops.attn.decoding_kernels``) with a per-slot validity mask, all G query heads of a kv head in one program
  (K and V read once); the S slots cut into splits (three at the paper's B8-H16 shape on an H200) merged with
  log-sum-exp by a combine launch. Default on CUDA.

Cost model per step: the whole cache is read once, B * S * H * (D + V) * elem bytes plus B * S * H bytes of valid
flags (invalid slots are masked loads); compute is 2 * B * S * HQ * (D + V) flops, so the op is memory bound and
its time should approach that byte count over the memory bandwidth (S = 1281 for the paper's w = 768, b = 512).
"""

from __future__ import annotations

from typing import Optional

import torch

from fla.utils import FLOAT_DTYPES, check_scale, check_tensor, use_triton


def naive_lte_decoding(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor,
                       scale: Optional[float] = None) -> torch.Tensor:
    """Reference in float32: o [B, 1, HQ, V] in q.dtype (zeros where a head has no valid slot)."""
    HQ, H = q.shape[2], k_cache.shape[2]
    G = HQ // H
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf = k_cache.float().repeat_interleave(G, dim=2)
    vf = v_cache.float().repeat_interleave(G, dim=2)
    ok = valid.repeat_interleave(G, dim=2)  # [B, S, HQ]
    logits = torch.einsum("bhd,bshd->bhs", q[:, 0].float(), kf) * scale
    logits = logits.masked_fill(~ok.permute(0, 2, 1), float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhs,bshv->bhv", p, vf)[:, None].to(q.dtype)


def lte_decoding_one_step_torch(q, k_cache, v_cache, valid, scale: float) -> torch.Tensor:
    """Torch path; o [B, 1, HQ, V] in q.dtype."""
    B, _, HQ, D = q.shape
    H = k_cache.shape[2]
    qf = q.float().reshape(B, H, HQ // H, D)
    logits = torch.einsum("bhgd,bshd->bhgs", qf, k_cache.float()) * scale
    logits = logits.masked_fill(~valid.permute(0, 2, 1)[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhgs,bshv->bhgv", p, v_cache.float())
    return o.reshape(B, 1, HQ, -1).to(q.dtype)


def lte_decoding_one_step(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid: torch.Tensor,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """One decoding step of LTE attention over the cache's valid slots.

    Args:
        q: [B, 1, HQ, D] (RoPE applied); HQ a multiple of H.
        k_cache: [B, S, H, D], v_cache: [B, S, H, V], q's dtype (float32, float16 or bfloat16).
        valid: [B, S, H] bool, the slots each kv head attends to.
        scale: default D ** -0.5.

    Returns:
        o [B, 1, HQ, V] in q.dtype; zeros for a (row, head) without any valid slot.

    Both paths run without host syncs (CUDA-graph capturable). CUDA tensors take the Triton kernel
    (``FLA_BACKEND`` overrides).
    """
    check_tensor("q", q, ndim=4, dtype=FLOAT_DTYPES)
    B, T, HQ, D = q.shape
    if T != 1:
        raise ValueError(f"q must hold one token per sequence, shape [B, 1, HQ, D], got {list(q.shape)}")
    check_tensor("k_cache", k_cache, ndim=4, dtype=q.dtype, device=q.device)
    check_tensor("v_cache", v_cache, ndim=4, dtype=q.dtype, device=q.device)
    if k_cache.shape[0] != B or k_cache.shape[-1] != D:
        raise ValueError(f"k_cache must have shape [B={B}, S, H, D={D}], got {list(k_cache.shape)}")
    B, S, H, _ = k_cache.shape
    if tuple(v_cache.shape[:3]) != (B, S, H):
        raise ValueError(f"v_cache must have shape [{B}, {S}, {H}, V] (as k_cache but its last dim), "
                         f"got {list(v_cache.shape)}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"the number of query heads HQ={HQ} (q.shape[2]) must be a multiple of the number of kv "
                         f"heads H={H} (k_cache.shape[2])")
    check_tensor("valid", valid, dtype=torch.bool, shape=(B, S, H), device=q.device)
    check_scale(scale)
    scale = D ** -0.5 if scale is None else float(scale)
    if use_triton(q):
        from fla.ops.lte.decoding_kernels import lte_decoding_fwd

        return lte_decoding_fwd(q, k_cache, v_cache, valid, scale)
    return lte_decoding_one_step_torch(q, k_cache, v_cache, valid, scale)
