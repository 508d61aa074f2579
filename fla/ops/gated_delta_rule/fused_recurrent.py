"""``fused_recurrent_gated_delta_rule``: token-by-token gated delta rule for decoding (T = 1) and short prefill.

Paths (see ``fla.utils.backend`` for ``FLA_BACKEND``):
- Triton (default on CUDA; ``FLA_BACKEND=triton`` also under the interpreter): ``fused_recurrent_kernels``,
  forward only, one program per (sequence, head, value block) carrying the state tile in registers.
- torch (CPU tensors; ``FLA_BACKEND=torch`` on CUDA): a token loop batched over sequences and heads (updating the
  state in place when no gradient is needed) for sequences of at most ``TOKEN_LOOP_MAX_LEN`` tokens
  (``TOKEN_LOOP_MAX_LEN_GRAD`` under autograd), else the chunked ``chunk_gated_delta_rule_torch``. Float32
  arithmetic.
- When a gradient is needed (grad mode on and any input requires grad) the torch path runs on any device, so
  training through this op still works, through autograd.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fla.ops.gated_delta_rule.chunk_torch import chunk_gated_delta_rule_torch
from fla.ops.gated_delta_rule.common import check_gdn_inputs
from fla.ops.utils.l2norm import l2norm
from fla.utils import use_triton

# Longest sequence for which the torch token loop beats the chunked path (measured on a 2-core x86 CPU, K = V = 64
# and 128): without autograd the crossover is at 10-12 tokens, with autograd at 4.
TOKEN_LOOP_MAX_LEN = 8
TOKEN_LOOP_MAX_LEN_GRAD = 4


def _to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, lens: list, max_len: int) -> torch.Tensor:
    """Packed [1, T, H, *D] -> [N, max_len, H, *D], zero past each sequence's end."""
    N = len(lens)
    if all(n == max_len for n in lens):
        return x.reshape(N, max_len, *x.shape[2:])
    starts = cu_seqlens[:-1].long()
    pos = torch.arange(max_len, device=x.device)
    lens_t = cu_seqlens[1:].long() - starts
    valid = pos[None, :] < lens_t[:, None]  # [N, L]
    index = torch.where(valid, starts[:, None] + pos[None, :], x.shape[1])  # x.shape[1]: a zero row
    flat = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])], 0)
    return flat.index_select(0, index.reshape(-1)).reshape(N, max_len, *x.shape[2:])


def _from_padded(o: torch.Tensor, cu_seqlens: torch.Tensor, lens: list, max_len: int) -> torch.Tensor:
    """[N, max_len, H, V] -> packed [1, T, H, V] (drops the padding)."""
    if all(n == max_len for n in lens):
        return o.reshape(1, -1, *o.shape[2:])
    starts = cu_seqlens[:-1].long()
    lens_t = cu_seqlens[1:].long() - starts
    seq = torch.repeat_interleave(torch.arange(len(lens), device=o.device), lens_t, output_size=int(cu_seqlens[-1]))
    pos = torch.arange(int(cu_seqlens[-1]), device=o.device) - starts[seq]
    return o.reshape(-1, *o.shape[2:]).index_select(0, seq * max_len + pos).unsqueeze(0)


def recurrent_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    cu_seqlens: Optional[torch.Tensor],
    lens: Optional[list] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token loop over time, batched over sequences and heads, in float32; q, k already normalised if asked.

    Differentiable by autograd; without autograd the state is updated in place. ``lens``: the sequence lengths
    (from ``cu_seqlens``) when already known. Returns (o [B, T, H, V] in v.dtype, final [N, H, K, V] float32 or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    if cu_seqlens is not None:
        lens = lens if lens is not None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        max_len = max(lens) if lens else 0
        q, k, v, g, beta = (_to_padded(x, cu_seqlens, lens, max_len) for x in (q, k, v, g, beta))
    N, L = q.shape[:2]
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state))

    q = q.to(dtype) * scale
    k, v = k.to(dtype), v.to(dtype)
    decay = g.to(dtype).exp()[..., None, None]  # [N, L, H, 1, 1]
    beta = beta.to(dtype)[..., None]  # [N, L, H, 1]
    # without autograd the state is updated in place, after the first decay has made it our own copy
    h = initial_state if initial_state is not None else torch.zeros(N, H, K, V, device=q.device, dtype=dtype)
    own = initial_state is None
    outputs = []
    for t in range(L):
        k_t = k[:, t, :, :, None]  # [N, H, K, 1]
        if grad or not own:
            h = (h * decay[:, t]).to(dtype)
            own = True
        else:
            h.mul_(decay[:, t])
        if grad:
            u = beta[:, t] * (v[:, t] - (k_t.transpose(-1, -2) @ h).squeeze(-2))
            h = h + k_t * u[:, :, None, :]
        else:
            u = (v[:, t] - (k_t.transpose(-1, -2) @ h).squeeze(-2)).mul_(beta[:, t])
            h.addcmul_(k_t, u[:, :, None, :])
        outputs.append((q[:, t, :, None, :] @ h).squeeze(-2))
    o = torch.stack(outputs, 1) if outputs else v.new_zeros(N, 0, H, V)
    if cu_seqlens is not None:
        o = _from_padded(o, cu_seqlens, lens, L)
    final = None
    if output_final_state:
        final = h if own else initial_state.to(dtype, copy=True)  # (no tokens: the initial state, copied)
    return o.to(out_dtype).reshape(B, T, H, V), final


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated delta rule stepped token by token; meant for decoding (T = 1 with a cached state) and short prefill.

    Per head: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = scale * S_t^T q_t.

    Args:
        q, k: [B, T, H, K]. v: [B, T, H, V]. g (log decay, <= 0): [B, T, H]. beta: [B, T, H].
            float32 / float16 / bfloat16, all on one device. K, V <= 256 on the Triton path.
        scale: output scale, default K ** -0.5.
        initial_state: [N, H, K, V] or None (zeros); N = B, or the number of sequences with ``cu_seqlens``.
        output_final_state: also return the final states [N, H, K, V] (float32), to pass as the next
            call's ``initial_state``.
        use_qk_l2norm_in_kernel: L2-normalise q and k over K first (x / sqrt(sum x^2 + 1e-6)).
        cu_seqlens: [N + 1] offsets of packed sequences (B = 1); e.g. batched decoding of N sequences with
            ``cu_seqlens = arange(N + 1)`` and T = N.

    Returns:
        (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] float32 or None)

    The Triton kernel is forward only: when grad mode is on and any input requires grad, the differentiable torch
    path runs instead (token loop for short sequences, ``chunk_gated_delta_rule_torch`` for longer ones), on any
    device, with q and k normalised by ``fla.ops.utils.l2norm``.
    """
    N = check_gdn_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None (meaning K ** -0.5), got {scale!r}")
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state))

    if not needs_grad and use_triton(q):
        from fla.ops.gated_delta_rule.fused_recurrent_kernels import fused_recurrent_gdn_fwd

        return fused_recurrent_gdn_fwd(q, k, v, g, beta, float(scale), initial_state, output_final_state,
                                       use_qk_l2norm_in_kernel, cu_seqlens, N)

    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q, output_dtype=torch.float32), l2norm(k, output_dtype=torch.float32)
    T = q.shape[1]
    lens = None
    if cu_seqlens is not None:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        max_len = max(lens)
    else:
        max_len = T
    if max_len <= (TOKEN_LOOP_MAX_LEN_GRAD if needs_grad else TOKEN_LOOP_MAX_LEN):
        return recurrent_gated_delta_rule_torch(q, k, v, g, beta, float(scale), initial_state, output_final_state,
                                                cu_seqlens, lens)
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, float(scale), initial_state, output_final_state,
                                        cu_seqlens)
