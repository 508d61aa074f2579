"""The LTE router's decode step: score one token from the router ring of the last R = 2m + 1 tokens.

The router (``fla.layers.lte_router``) is a stack of non-causal convolutions over concat(k, v) of each kv head; a
token's score depends on the m tokens on either side (m = margin = receptive_field // 2). During decoding the
layer keeps a **router ring** of the pre-RoPE keys and values of the last R tokens and, at each new token (cache
position p), scores the token at p - m, whose context has just become complete:

    ring        [B, R, H * 2 hd]   token at cache position c in slot c % R; per head its key then its value; zero
                                   for a pad or a position before the first token
    ring_valid  [B, R] bool        the slot holds a real token

``lte_router_step`` (in place) writes the new token into slot p % R, computes the centre's score exactly as the
full forward would (``router_centre_logits`` on the R tokens in time order; zero outside the sequence) and stores it
into the attention cache's score ring, ``score[b, (p - m) % (w + 1), h]`` (-inf when the centre is not a real
token). One Triton kernel (``fla.ops.lte.router_step_kernels``) does all of it; the torch path takes about thirty
launches (scatter, gather, three convolutions with their masks and SiLUs, projection, activation, scatter), each a
few microseconds inside a CUDA graph whatever its size.

The kernel is taken only with ``FLA_BACKEND=triton`` for now: it was written in a session without a GPU and has
been checked against the torch path under the Triton interpreter (``tests/ops/lte/test_router_step.py``) and
compiled for sm_90 (bf16: 117 registers, no spills), but not yet run on a GPU (``test_router_step_gpu_bf16``).
With the default ``FLA_BACKEND=auto`` CUDA tensors take the torch path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fla.utils import check_tensor, use_triton
from fla.utils.backend import requested_backend


def router_centre_logits(
    x: torch.Tensor,
    mask: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[Optional[torch.Tensor]],
    conv_dilation: Sequence[int],
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    groups: int,
    dropout_prob: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The convolution stack's logits at the centre of a window of RF = 1 + sum_j (k_j - 1) d_j positions.

    Args:
        x: [N, G c_0, RF], zero where ``mask`` is False; mask: [N, RF] bool (True = token).
        conv_weights: per convolution j a [G c_{j+1}, c_j, k_j] weight; conv_biases: [G c_{j+1}] or None each.
        conv_dilation: d_j. proj_weight: [G, c_J] (or [G, c_J, 1]); proj_bias: [G]. groups: G.
        dropout_prob, training: dropout before each convolution (training only).

    Returns [N, G] in the compute dtype (the promotion of x's and the weights' dtypes). Each convolution runs
    without padding on exactly the positions the centre depends on, so 'same' padding is never reached; every
    output but the last is multiplied by the mask of the position it is centred on, then SiLU. The centre's own
    mask at the last convolution is left out (a masked centre's logit is unspecified; the caller masks its score).
    """
    dtype = torch.promote_types(x.dtype, proj_weight.dtype)
    x = x.to(dtype)
    offset, last = 0, len(conv_weights) - 1
    for j, (w, b, d) in enumerate(zip(conv_weights, conv_biases, conv_dilation)):
        x = F.dropout(x, dropout_prob, training)
        x = F.conv1d(x, w.to(dtype), None if b is None else b.to(dtype), dilation=d, groups=groups)
        offset += (w.shape[-1] - 1) * d // 2  # window position of output 0
        if j < last:
            x = x * mask[:, None, offset:offset + x.shape[-1]]  # bool: exact 0 / 1, no cast launch
        x = F.silu(x)
    pw = proj_weight.reshape(proj_weight.shape[0], -1, 1)
    return F.conv1d(x, pw.to(dtype), proj_bias.to(dtype), groups=groups)[..., 0]


def routing_activation(logits: torch.Tensor, routing_method: str) -> torch.Tensor:
    """Router logits (any shape) -> float32 scores: sigmoid(x) - 0.5 ('sigmoid') or ReLU(x) ('relu'). The
    activation runs in float32: sigmoid(x) - 0.5 in bf16 rounds small positive logits to a score of 0 (not kept);
    the upcast only makes the keep rule score > 0 <=> logit > 0 exact."""
    logits = logits.float()
    return torch.sigmoid(logits) - 0.5 if routing_method == "sigmoid" else torch.relu(logits)


def router_centre_scores(
    x: torch.Tensor,
    mask: torch.Tensor,
    num_heads: int,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[Optional[torch.Tensor]],
    conv_dilation: Sequence[int],
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    groups: int,
    routing_method: str,
    dropout_prob: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The centre's score of each head from a window of the router's input, RF positions in time order.

    Args:
        x: [B, H * 2 hd, RF] (H = ``num_heads``; per head its key then its value features), zero where ``mask`` is
            False. mask: [B, RF] bool. conv_weights .. proj_bias: as ``router_centre_logits``.
        groups: H (one stack per head, grouped convolutions over the whole x) or 1 (one stack for every head: each
            head becomes a row of its own). routing_method: 'sigmoid' | 'relu' (``routing_activation``).

    Returns [B, H] float32: the score of the window's centre, -inf where the centre is not a token.
    """
    B, C, RF = x.shape
    if groups == num_heads:
        logits = router_centre_logits(x, mask, conv_weights, conv_biases, conv_dilation, proj_weight, proj_bias,
                                      groups, dropout_prob, training)
    else:
        logits = router_centre_logits(x.reshape(B * num_heads, C // num_heads, RF),
                                      mask.repeat_interleave(num_heads, dim=0), conv_weights, conv_biases,
                                      conv_dilation, proj_weight, proj_bias, 1, dropout_prob,
                                      training).reshape(B, num_heads)
    return torch.where(mask[:, RF // 2, None], routing_activation(logits, routing_method), float("-inf"))


def _triton_supported(ring, conv_weights, conv_biases, proj_weight, head_dim, R) -> bool:
    from fla.ops.lte.router_step_kernels import MAX_LAYERS

    channels = [w.shape[1] for w in conv_weights] + [proj_weight.shape[1]]
    pow2 = all(c >= 16 and c & (c - 1) == 0 for c in channels)
    halving = all(w.shape[0] == proj_weight.shape[0] * (w.shape[1] // 2) for w in conv_weights)
    return (1 <= len(conv_weights) <= MAX_LAYERS and pow2 and halving and head_dim & (head_dim - 1) == 0 and R <= 64
            and all(b is not None for b in conv_biases) and ring.dtype == proj_weight.dtype
            and all(w.dtype == proj_weight.dtype for w in conv_weights))


def lte_router_step(
    ring: torch.Tensor,
    ring_valid: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    real: torch.Tensor,
    pos: torch.Tensor,
    score: torch.Tensor,
    window_size: int,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[Optional[torch.Tensor]],
    conv_dilation: Sequence[int],
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    groups: int,
    routing_method: str = "sigmoid",
    dropout_prob: float = 0.0,
    training: bool = False,
) -> None:
    """One router decode step, IN PLACE (returns None); see the module docstring.

    Args:
        ring: [B, R, H * 2 hd] (contiguous), ring_valid: [B, R] bool: the router ring, R = 2m + 1.
        new_k, new_v: [B, H, hd]: the new token's pre-RoPE key and value. real: [B] bool (False for a pad).
        pos: [B] int64 cache position of the new token (a tensor: no host sync, CUDA-graph capturable).
        score: [B, S, H] float32, the attention cache's scores (``fla.ops.lte.cache``), S >= window_size + 1.
        conv_weights .. groups: the stack's parameters as ``router_centre_logits`` takes them (G = H for a stack
            grouped by head, 1 for one stack applied to every head); routing_method: 'sigmoid' | 'relu'.
        dropout_prob, training: dropout in the torch path (the Triton path runs only without active dropout).

    No gradient flows: the ring and the scores are cache state (selection is not differentiable). The Triton kernel
    runs (with ``FLA_BACKEND=triton``, see the module docstring) without active dropout, for power-of-two channels
    (>= 16), at most 4 convolutions, R <= 64 and one dtype for the ring and the weights; the torch path otherwise.
    """
    check_tensor("ring", ring, ndim=3)
    check_tensor("new_k", new_k, ndim=3, device=ring.device)
    B, R, C = ring.shape
    H, hd = new_k.shape[1:]
    if C != 2 * H * hd or R % 2 == 0:
        raise ValueError(f"ring must be [B, R (odd), 2 * H * hd] with new_k [B, H={H}, hd={hd}], got ring "
                         f"{list(ring.shape)}")
    check_tensor("ring_valid", ring_valid, shape=(B, R), dtype=torch.bool, device=ring.device)
    check_tensor("new_v", new_v, shape=tuple(new_k.shape), device=ring.device)
    check_tensor("real", real, shape=(B,), dtype=torch.bool, device=ring.device)
    check_tensor("pos", pos, shape=(B,), dtype=(torch.int64, torch.int32), device=ring.device)
    check_tensor("score", score, ndim=3, dtype=torch.float32, device=ring.device)
    if score.shape[0] != B or score.shape[2] != H or score.shape[1] < window_size + 1:
        raise ValueError(f"score must be [B={B}, S >= window_size + 1 = {window_size + 1}, H={H}], got "
                         f"{list(score.shape)}")
    if groups not in (1, H):
        raise ValueError(f"groups must be 1 (one stack for every head) or H={H} (one per head), got {groups}")
    if len(conv_weights) != len(conv_dilation) or len(conv_biases) != len(conv_weights) or not conv_weights:
        raise ValueError(f"conv_weights, conv_biases and conv_dilation must have one entry per convolution (at "
                         f"least one), got {len(conv_weights)}, {len(conv_biases)} and {len(conv_dilation)}")
    if conv_weights[0].shape[1] != 2 * hd:
        raise ValueError(f"the first convolution takes {conv_weights[0].shape[1]} channels per group, but the ring "
                         f"holds 2 * hd = {2 * hd} per head (groups={groups})")
    rf = 1 + sum((w.shape[-1] - 1) * d for w, d in zip(conv_weights, conv_dilation))
    if rf != R:
        raise ValueError(f"the ring holds R={R} tokens but the convolutions' receptive field is {rf}")
    if B == 0:
        return None
    with torch.no_grad():
        _router_step(ring, ring_valid, new_k, new_v, real, pos, score, window_size + 1, conv_weights, conv_biases,
                     conv_dilation, proj_weight, proj_bias, groups, routing_method, dropout_prob, training)
    return None


def _router_step(ring, ring_valid, new_k, new_v, real, pos, score, W1, conv_weights, conv_biases, conv_dilation,
                 proj_weight, proj_bias, groups, routing_method, dropout_prob, training) -> None:
    B, R, C = ring.shape
    H, hd = new_k.shape[1:]
    if (requested_backend() == "triton" and use_triton(ring) and not (training and dropout_prob > 0)
            and ring.is_contiguous()
            and _triton_supported(ring, conv_weights, conv_biases, proj_weight, hd, R)):
        _lte_router_step_triton(ring, ring_valid, new_k, new_v, real, pos, score, W1, conv_weights, conv_biases,
                                conv_dilation, proj_weight, proj_bias, groups, routing_method)
        return

    m = R // 2
    slot = pos.long().remainder(R)
    rows = torch.arange(B, device=ring.device)
    new = torch.cat([new_k, new_v], -1).to(ring.dtype) * real[:, None, None]  # [B, H, 2 hd]
    ring[rows, slot] = new.reshape(B, C)
    ring_valid[rows, slot] = real
    order = (pos.long()[:, None] - 2 * m + torch.arange(R, device=ring.device)).remainder(R)  # [B, R] time order
    x = ring.gather(1, order[..., None].expand(B, R, C)).transpose(1, 2)  # [B, C, R]
    mask = ring_valid.gather(1, order)
    target = (pos.long() - m).remainder(W1)
    score[rows, target] = router_centre_scores(x, mask, H, conv_weights, conv_biases, conv_dilation, proj_weight,
                                               proj_bias, groups, routing_method, dropout_prob, training)


def _lte_router_step_triton(ring, ring_valid, new_k, new_v, real, pos, score, W1, conv_weights, conv_biases,
                            conv_dilation, proj_weight, proj_bias, groups, routing_method) -> None:
    from fla.ops.lte.router_step_kernels import MAX_LAYERS, _lte_router_step_kernel, launch_constexprs

    B = ring.shape[0]
    H, hd = new_k.shape[1:]
    L = len(conv_weights)
    ws = [w.contiguous() for w in conv_weights] + [proj_weight] * (MAX_LAYERS - L)
    bs = [b.contiguous() for b in conv_biases] + [proj_bias] * (MAX_LAYERS - L)
    constexprs, num_warps = launch_constexprs(H, hd, [w.shape[-1] for w in conv_weights], conv_dilation,
                                              groups == H and H > 1, routing_method == "sigmoid",
                                              proj_weight.dtype == torch.float32)
    _lte_router_step_kernel[(B, H)](
        ring, ring_valid.view(torch.uint8), new_k.contiguous(), new_v.contiguous(), real.contiguous().view(torch.uint8),
        pos.contiguous(), score,
        ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], ws[3], bs[3], proj_weight.contiguous(), proj_bias.contiguous(),
        W1, score.stride(0), score.stride(1), score.stride(2), **constexprs, num_warps=num_warps,
    )
