"""Torch reference of the gated delta rule: the obvious token-by-token recurrence in float32 (the truth for tests).

Per head, with state S in R^{K x V} (float32), log-decay g_t, write strength beta_t:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,        o_t = scale * S_t^T q_t

computed as: S <- exp(g_t) S;  u = beta_t (v_t - S^T k_t);  S <- S + k_t u^T;  o_t = scale * S^T q_t.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def l2norm_reference(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dimension (what ``use_qk_l2norm_in_kernel`` applies)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _recurrence(q, k, v, g, beta, scale, state):
    """One sequence: q, k [T, H, K], v [T, H, V], g, beta [T, H] (float32), state [H, K, V]. Returns (o, state)."""
    outputs = []
    for t in range(q.shape[0]):
        state = state * g[t].exp()[:, None, None]
        u = beta[t][:, None] * (v[t] - torch.einsum("hkv,hk->hv", state, k[t]))
        state = state + torch.einsum("hk,hv->hkv", k[t], u)
        outputs.append(scale * torch.einsum("hkv,hk->hv", state, q[t]))
    o = torch.stack(outputs, 0) if outputs else v.new_zeros(v.shape)
    return o, state


def naive_recurrent_gated_delta_rule(
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
    """Token-by-token gated delta rule in float32 (differentiable by autograd; slow: for tests and tiny inputs).

    Args:
        q, k: [B, T, H, K]. v: [B, T, H, V]. g (log decay, <= 0), beta: [B, T, H].
        scale: multiplies the output; default K ** -0.5.
        initial_state: [N, H, K, V] (N = B, or the number of sequences with ``cu_seqlens``) or None (zeros).
        output_final_state: also return the final states [N, H, K, V] (float32).
        use_qk_l2norm_in_kernel: L2-normalise q and k over K first (x / sqrt(sum x^2 + 1e-6)).
        cu_seqlens: [N + 1] offsets of packed sequences (B = 1).

    Returns:
        (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] float32 or None)
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dtype = v.dtype
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm_reference(q), l2norm_reference(k)
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]
    o = torch.zeros(B, T, H, V, device=q.device, dtype=torch.float32)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        state = (initial_state[n].float() if initial_state is not None
                 else torch.zeros(H, K, V, device=q.device, dtype=torch.float32))
        o_n, state = _recurrence(q[b, start:end], k[b, start:end], v[b, start:end], g[b, start:end],
                                 beta[b, start:end], scale, state)
        o = o.index_put((torch.tensor(b), torch.arange(start, end, device=q.device)), o_n) if end > start else o
        finals.append(state)
    final = torch.stack(finals, 0) if output_final_state else None
    return o.to(dtype), final
