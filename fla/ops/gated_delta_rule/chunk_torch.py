"""Chunked gated delta rule in plain torch: the CPU path of ``chunk_gated_delta_rule`` (differentiable by autograd).

Per head, with log decays g, write strengths beta and state S in R^{K x V} (see ``naive.py``), the tokens are cut into
chunks of C = 64. Inside a chunk, with gc the cumulative sum of g from the chunk start and S the state at the start:

    A_rs = beta_r (k_r . k_s) exp(gc_r - gc_s)  for r > s (strictly lower triangular)
    W = (I + A)^{-1} (beta exp(gc) k),   U = (I + A)^{-1} (beta v)        (UT / WY representation, one solve)
    v_new = U - W S                                                       (the values actually written)
    o = scale [ (q exp(gc)) S + tril_incl(q k^T exp(gc_r - gc_s)) v_new ]
    S <- exp(gc_last) S + (k exp(gc_last - gc))^T v_new

Everything except the last recurrence (and ``v_new``, which needs S) is batched over all chunks, heads and rows; the
state update is a Python loop over chunk steps (T / C iterations), each batched over sequences and heads.

Layout: the (possibly packed) tokens are gathered into chunks ordered step-major (all first chunks, then all second
chunks, ...) with the sequences sorted by decreasing chunk count, so that the sequences still running at step j are
a prefix of the state batch and their chunks a contiguous slice. A sequence's last chunk is padded with zero
tokens (k = v = g = beta = 0), which leave the state unchanged; their outputs are dropped.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from fla.ops.utils.index import prepare_position_ids, prepare_sequence_ids

CHUNK_SIZE = 64


def _chunk_layout(cu_seqlens: torch.Tensor, chunk_size: int):
    """Index plan for cutting packed tokens into step-major chunks.

    Returns (gather [NC * C] token index per chunk slot, ``total`` for padding; scatter [total] chunk slot of each
    token; active [J] number of sequences with a chunk at step j (non-increasing); order [N] the sequences in state
    batch order; rank [N] position of each sequence in the state batch).
    """
    device = cu_seqlens.device
    C = chunk_size
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    total = int(cu_seqlens[-1])
    num_chunks = (lens + C - 1) // C
    order = torch.argsort(num_chunks, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    sorted_chunks = num_chunks[order]
    J = int(sorted_chunks[0]) if sorted_chunks.numel() else 0
    active = (sorted_chunks[None, :] > torch.arange(J, device=device)[:, None]).sum(1)
    step_offset = torch.cumsum(active, 0) - active
    seq = prepare_sequence_ids(cu_seqlens).long()
    pos = prepare_position_ids(cu_seqlens).long()
    scatter = (step_offset[pos // C] + rank[seq]) * C + pos % C
    NC = int(active.sum())
    gather = torch.full((NC * C,), total, dtype=torch.long, device=device)
    gather[scatter] = torch.arange(total, device=device)
    return gather, scatter, active.tolist(), order, rank


def _to_chunks(x: torch.Tensor, gather: torch.Tensor, C: int) -> torch.Tensor:
    """[total, H, *D] -> [NC, H, C, *D] (zero rows where a chunk runs past its sequence's end)."""
    padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])], 0)
    out = padded.index_select(0, gather)
    out = out.view(-1, C, *x.shape[1:])
    return out.transpose(1, 2).contiguous()


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    chunk_size: int = CHUNK_SIZE,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunked gated delta rule in torch (float32 arithmetic, float64 if the inputs are float64); autograd-friendly.

    Inputs are assumed validated (``check_gdn_inputs``) and q, k already L2-normalised if that was requested.

    Args:
        q, k: [B, T, H, K]. v: [B, T, H, V]. g (log decay, <= 0), beta: [B, T, H].
        scale: output scale, default K ** -0.5.
        initial_state: [N, H, K, V] or None (zeros); N = B, or the number of sequences with ``cu_seqlens``.
        output_final_state: also return the final states.
        cu_seqlens: [N + 1] offsets of packed sequences (B = 1); sequences never exchange state.
        chunk_size: tokens per chunk (shrunk to the longest sequence, rounded up to 16, when that is shorter).

    Returns:
        (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] in float32 (float64 for float64 inputs) or None)
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    device = q.device
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, B * T + 1, max(T, 1), device=device)[: B + 1] if T > 0 else \
            torch.zeros(B + 1, dtype=torch.long, device=device)
    cu_seqlens = cu_seqlens.long()
    N = cu_seqlens.numel() - 1
    total = B * T
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if N > 0 else 0

    h0 = (initial_state.to(dtype) if initial_state is not None
          else torch.zeros(N, H, K, V, device=device, dtype=dtype))
    if total == 0 or max_len == 0:
        o = v.new_zeros(B, T, H, V) + 0 * v  # keeps the graph connected for empty inputs
        return o, (h0.clone() if output_final_state else None)

    C = min(chunk_size, max(16, -(-max_len // 16) * 16))
    gather, scatter, active, order, rank = _chunk_layout(cu_seqlens, C)
    NC = gather.numel() // C

    q_c = _to_chunks(q.reshape(total, H, K).to(dtype) * scale, gather, C)  # [NC, H, C, K]
    k_c = _to_chunks(k.reshape(total, H, K).to(dtype), gather, C)
    v_c = _to_chunks(v.reshape(total, H, V).to(dtype), gather, C)  # [NC, H, C, V]
    g_c = _to_chunks(g.reshape(total, H).to(dtype), gather, C)  # [NC, H, C]
    b_c = _to_chunks(beta.reshape(total, H).to(dtype), gather, C)

    # The cumulative decays are summed and differenced in float64: with strong decays |gc| grows to thousands and
    # float32 differences gc_r - gc_s of nearby tokens would lose their leading digits (exp(diff) off by 1e-3).
    gc64 = g_c.to(torch.float64).cumsum(-1)
    gc = gc64.to(dtype)
    g_last = gc[..., -1:]  # [NC, H, 1]
    lower_incl = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    # exp(gc_r - gc_s) on and below the diagonal; the arguments above it are masked before exp (they can overflow)
    diff = (gc64[..., :, None] - gc64[..., None, :]).to(dtype)
    decay = diff.masked_fill(~lower_incl, float("-inf")).exp()  # [NC, H, C, C]

    A = (k_c @ k_c.transpose(-1, -2) * decay * b_c[..., None]).tril(-1)
    rhs = torch.cat([k_c * (b_c * gc.exp())[..., None], v_c * b_c[..., None]], -1)
    WU = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    W, U = WU.split([K, V], -1)
    k_decayed = k_c * (gc64[..., -1:] - gc64).to(dtype).exp()[..., None]  # [NC, H, C, K]
    k_decayed_t = k_decayed.transpose(-1, -2)
    chunk_decay = g_last.exp()[..., None]  # [NC, H, 1, 1]

    # inter-chunk recurrence: step j updates the states of the ``active[j]`` sequences still running
    h = h0.index_select(0, order) if N > 1 else h0
    finals: List[torch.Tensor] = [h[active[0]:]]  # empty sequences keep their initial state
    h = h[:active[0]]
    states, values = [], []
    offset = 0
    J = len(active)
    for j in range(J):
        n = active[j]
        sl = slice(offset, offset + n)
        states.append(h)
        v_new = U[sl] - W[sl] @ h
        values.append(v_new)
        offset += n
        if j == J - 1 and not output_final_state:
            break
        h = chunk_decay[sl] * h + k_decayed_t[sl] @ v_new
        n_next = active[j + 1] if j + 1 < J else 0
        finals.append(h[n_next:])
        h = h[:n_next]
    h_all = torch.cat(states, 0) if J > 1 else states[0]  # state at the start of every chunk, [NC, H, K, V]
    v_new_all = torch.cat(values, 0) if J > 1 else values[0]

    o_c = (q_c * gc.exp()[..., None]) @ h_all + (q_c @ k_c.transpose(-1, -2) * decay) @ v_new_all
    o = o_c.transpose(1, 2).reshape(NC * C, H, V).index_select(0, scatter).view(B, T, H, V)

    final = None
    if output_final_state:
        final = torch.cat(finals[::-1], 0)
        if N > 1:
            final = final.index_select(0, rank)
    return o.to(v.dtype), final
