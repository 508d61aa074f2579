"""``LTEAttention``: sliding-window attention plus Learnable Token Eviction (the paper's mixer).

Per token x (hidden size H), HQ query heads and H_kv key/value heads of size hd = H / HQ:

    q, k, v = q_proj x, k_proj x, v_proj x
    score   = router(k, v)                   [B, T, H_kv] float32, from the pre-RoPE keys (``fla.layers.lte_router``)
    keep_j  = score_j > 0 or j is a sink (one of the first ``sink_size`` real tokens of its sequence)
    o_i     = softmax over keys j <= i with (i - j <= window_size or keep_j) of RoPE(q_i) . RoPE(k_j) / sqrt(hd)
    y       = o_proj o

``window_size = w`` is the LTE convention: the current token plus the w previous ones (w + 1 keys). Positions count
real tokens only (left padding gets no position), as in ``fla.layers.Attention``: a padded batch equals the packed
one. The router's score reaches the loss through the straight-through gradient <dL/dv_j, v_j> and the L1
regulariser (``fla.models.lte_controller``); the forward returns its ``RoutingStats`` as the second output.

Training keeps every selected token. Evaluation without a cache applies the reference's cap: keys outside the last
query's window are pruned to the top ``buffer_size`` (sinks included) by score, for every query of the sequence
(``fla.ops.lte.enforce_buffer_size``). A cached prefill computes the same outputs and then builds the cache.

Cache (``lte_state`` in ``fla.models.utils.Cache``, every tensor batch-first; ``fla.ops.lte.cache`` documents the
layout): the ring of the last w + 1 tokens (rotated keys, values, scores, sink and valid flags) followed by the
retained buffer of at most ``buffer_size`` tokens; ``router_kv`` [B, 2m + 1, H_kv 2 hd] / ``router_valid``
[B, 2m + 1]: the router ring, the pre-RoPE keys and values of the last 2m + 1 tokens (m = the router's margin; the
token at cache position c in slot c % (2m + 1); per head its key then its value), zero where ``router_valid`` is
False; ``pos`` [B] tokens seen including pads (ring slot of
the next token = pos % (w + 1)); ``real`` [B] real tokens seen (the next RoPE position; sinks are real tokens
0 .. sink_size - 1, also when the prompt is shorter than sink_size).

Decode step for a new token at cache position c: its q / k are rotated at position ``real``; the router scores token
c - m, whose +-m context has just become complete, on the 2m + 1 cached router inputs (zero outside the sequence,
as the full forward pads; ``LTERouter.decode_step`` computes that one position only), and writes that score into
its ring slot (-inf for a pad, which its slot already holds), so every token's score equals the full forward's
before it can leave the window (the reference re-scores in batches and de-rotates cached keys, with the
wrong offset for prompts under 2m tokens); then ``lte_cache_step`` moves the token leaving the window into the
buffer if it is selected and outranks the buffer's lowest (streaming top-b; sinks always win) and writes the new
token into the ring; then ``lte_decoding_one_step`` attends over every valid slot. The retained set after each step
is the streaming top-b of the scores of the tokens that left the window. Several new tokens on a non-empty cache run
as consecutive decode steps.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from fla.layers.lte_router import LTEConvolutionStack, LTERouter, RoutingStats
from fla.layers.utils import (
    check_mixer_inputs,
    left_align,
    left_aligned_mask,
    pad_input,
    padding_mask,
    unpad_input,
)
from fla.modules import RotaryEmbedding
from fla.ops.utils.index import prepare_lens
from fla.utils import check_positive_int


def _check_non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _router_ring(x: torch.Tensor, size: int) -> torch.Tensor:
    """The router ring of a prompt x [N, L, ...]: its last ``size`` steps with step c in slot c % size, zeros in the
    slots of positions before the first (L < size).

    A new contiguous tensor holding only those steps (the decode steps write into it in place, and it must not keep
    the prompt's keys alive)."""
    L = x.shape[1]
    tail = x[:, max(L - size, 0):]
    ordered = torch.cat([tail.new_zeros(tail.shape[0], size - tail.shape[1], *tail.shape[2:]), tail], 1)
    return torch.roll(ordered, L % size, 1).contiguous()  # position L - size + i goes to slot (L + i) % size


class LTEAttention(nn.Module):
    """Sliding-window attention with learnable token eviction; see the module docstring.

    Args:
        hidden_size: H. num_heads: HQ (head size hd = H // HQ). num_kv_heads: H_kv (None: HQ), divides HQ.
        window_size: w >= router margin: the current token plus w previous ones are always visible.
        rope_theta: the RoPE base. max_position_embeddings: accepted for compatibility (no table limit).
        qkv_bias: biases on q/k/v projections.
        conv_size, conv_dilation, dropout_prob, routing_method, routing_grad, routing_shared, shared_stack: the
            router's (``fla.layers.lte_router.LTERouter``).
        buffer_size: b >= 0, the retained tokens beyond the window (sinks included) at inference.
        sink_size: s >= 0 first real tokens of each sequence that are always kept.
        layer_idx: the layer's index in the model (its cache slot, and the id in its ``RoutingStats``).

    Parameters (the reference's state-dict keys): ``q_proj`` [HQ hd, H], ``k_proj`` / ``v_proj`` [H_kv hd, H],
    ``o_proj`` [H, HQ hd], ``router.conv_stack.convs.{j}.*`` and ``router.conv_stack.proj.*``.
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 32,
        num_kv_heads: Optional[int] = None,
        window_size: int = 768,
        rope_theta: Optional[float] = 10000.0,
        max_position_embeddings: Optional[int] = None,
        qkv_bias: bool = False,
        conv_size: Sequence[int] = (3, 3, 3),
        conv_dilation: Sequence[int] = (2, 2, 2),
        dropout_prob: float = 0.0,
        buffer_size: int = 512,
        sink_size: int = 4,
        routing_method: str = "sigmoid",
        routing_grad: bool = True,
        routing_shared: str = "head",
        shared_stack: Optional[LTEConvolutionStack] = None,
        layer_idx: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (grouped-query attention)")
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden_size={hidden_size} must be num_heads={num_heads} times an even head size")
        _check_non_negative_int("window_size", window_size)
        _check_non_negative_int("buffer_size", buffer_size)
        _check_non_negative_int("sink_size", sink_size)
        if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0):
            raise ValueError(f"layer_idx must be None or an int >= 0, got {layer_idx!r}")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.window_size = window_size
        self.buffer_size = buffer_size
        self.sink_size = sink_size
        self.rope_theta = 10000.0 if rope_theta is None else float(rope_theta)
        self.max_position_embeddings = max_position_embeddings
        self.layer_idx = layer_idx

        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bool(qkv_bias))
        self.k_proj = nn.Linear(hidden_size, kv_dim, bias=bool(qkv_bias))
        self.v_proj = nn.Linear(hidden_size, kv_dim, bias=bool(qkv_bias))
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(dim=self.head_dim, base=self.rope_theta)
        self.router = LTERouter(num_kv_heads, self.head_dim, conv_size, conv_dilation, dropout_prob=dropout_prob,
                                routing_method=routing_method, routing_grad=routing_grad,
                                routing_shared=routing_shared, shared_stack=shared_stack)
        if window_size < self.router.margin:
            raise ValueError(f"window_size={window_size} must be at least the router's margin {self.router.margin} "
                             "(receptive_field // 2): a token must still be in the window when its score is complete")

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window_size={self.window_size}, buffer_size={self.buffer_size}, sink_size={self.sink_size}, "
                f"layer_idx={self.layer_idx}")

    # -------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Any] = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, Optional[RoutingStats], Optional[Any]]:
        """Mix the tokens of ``hidden_states`` [B, T, H].

        Args:
            attention_mask: [B, T'] 0/1 padding mask (left padding for cached use); its last T columns are used.
            past_key_values: an ``fla.models.utils.Cache`` or None; with ``use_cache`` the layer stores its state.
            kwargs: ``cu_seqlens`` [N + 1] for packed B = 1 inputs (not with a padding mask); others are ignored.

        Returns:
            (output [B, T, H], RoutingStats of this forward (None for cached decode steps), past_key_values)
        """
        check_mixer_inputs(hidden_states, self.hidden_size, past_key_values, self.layer_idx)
        if output_attentions:
            warnings.warn("LTEAttention does not return attention weights; output_attentions is ignored", stacklevel=2)
        B, T, _ = hidden_states.shape
        cu_seqlens = kwargs.get("cu_seqlens")
        mask = padding_mask(attention_mask, B, T, cu_seqlens)
        mask = None if mask is None else mask != 0

        state = None
        if past_key_values is not None and len(past_key_values) > self.layer_idx:
            state = past_key_values[self.layer_idx].get("lte_state")
        if state is not None:
            if cu_seqlens is not None:
                raise ValueError("LTEAttention continues a cache one token per row: cu_seqlens cannot be used then")
            return self._continue(hidden_states, mask, state, past_key_values, use_cache), None, past_key_values

        indices = None
        if mask is not None:
            hidden_states, indices, cu_seqlens, _ = unpad_input(hidden_states, mask)
        q, k, v = self._project(hidden_states)
        score = self.router(k, v, cu_seqlens=cu_seqlens)
        from fla.ops.lte import enforce_buffer_size, parallel_lte_attn, select_tokens

        if self.router.enabled:
            selected = select_tokens(score.detach(), self.sink_size, cu_seqlens)
        else:  # warm-up: every token is kept (full causal attention)
            selected = torch.ones_like(score, dtype=torch.bool)
        if not self.training:
            selected = enforce_buffer_size(score.detach(), selected, self.buffer_size, self.window_size,
                                           self.sink_size, cu_seqlens)
        q_rot, k_rot = self.rotary(q, k, seqlen_offset=0, cu_seqlens=cu_seqlens)
        o = parallel_lte_attn(q_rot, k_rot, v, score, self.window_size, self.sink_size, cu_seqlens=cu_seqlens,
                              selected=selected)
        o = self.o_proj(o.flatten(-2))

        if use_cache and past_key_values is not None:
            self._prefill_cache(k, v, k_rot, score.detach(), indices, mask, cu_seqlens, B, T, past_key_values)
        if indices is not None:
            o = pad_input(o, indices, B, T)
            score = pad_input(score, indices, B, T).masked_fill(~mask[..., None], float("-inf"))
            selected = pad_input(selected, indices, B, T)
        stats = RoutingStats(layer_idx=self.layer_idx if self.layer_idx is not None else 0, score=score,
                             selected=selected, margin=self.router.margin)
        return o, stats, past_key_values

    # -------------------------------------------------------------------------------------------------------------

    def _project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return q, k, v

    def _prefill_cache(self, k, v, k_rot, score, indices, mask, cu_seqlens, B, T, past_key_values) -> None:
        """Build the layer's state from a whole prompt (packed or padded) in the left-padded row layout."""
        from fla.ops.lte import lte_cache_prefill

        if indices is not None:  # padded rows
            rows = [pad_input(x, indices, B, T) for x in (k, v, k_rot, score)]
            valid = mask
        elif cu_seqlens is not None:  # packed sequences: one cache row each, left-aligned
            lens = prepare_lens(cu_seqlens.long())
            valid = left_aligned_mask(lens, int(lens.max()) if lens.numel() else 0)
            rows = [left_align(x[0], valid) for x in (k, v, k_rot, score)]
        else:
            rows = [k, v, k_rot, score]
            valid = torch.ones(B, T, dtype=torch.bool, device=k.device)
        k_raw, v_raw, k_rot, score = rows
        score = score.float().masked_fill(~valid[..., None], float("-inf"))
        real_pos = valid.long().cumsum(1) - 1
        sink = valid & (real_pos < self.sink_size)
        k_cache, v_cache, s_cache, sink_cache, valid_cache = lte_cache_prefill(
            k_rot.detach(), v_raw.detach(), score, sink, valid, self.window_size, self.buffer_size)
        R = 2 * self.router.margin + 1
        N, L = valid.shape
        router_kv = torch.cat([k_raw, v_raw], -1).detach().flatten(2) * valid[..., None]  # [N, L, H_kv 2 hd]
        state = {"k_cache": k_cache, "v_cache": v_cache, "score": s_cache, "sink": sink_cache, "valid": valid_cache,
                 "router_kv": _router_ring(router_kv, R), "router_valid": _router_ring(valid, R),
                 "pos": torch.full((N,), L, dtype=torch.long, device=valid.device),
                 "real": valid.long().sum(1)}
        past_key_values.update(layer_idx=self.layer_idx, offset=T, lte_state=state)

    def _continue(self, hidden_states, mask, state, past_key_values, use_cache) -> torch.Tensor:
        """New tokens on a non-empty cache: one decode step per column (left padding: a pad column may only come
        before a row's first real token, which the cache handles as a blank)."""
        B, T, _ = hidden_states.shape
        if state["pos"].shape[0] != B:
            raise ValueError(f"the cache of layer {self.layer_idx} holds {state['pos'].shape[0]} sequences, but the "
                             f"input has {B}")
        if not use_cache:  # do not change the caller's cache
            state = {name: t.clone() for name, t in state.items()}
        outs = []
        for t in range(T):
            real = torch.ones(B, dtype=torch.bool, device=hidden_states.device) if mask is None else mask[:, t]
            outs.append(self._decode_step(hidden_states[:, t:t + 1], real, state))
        if use_cache:
            past_key_values.update(layer_idx=self.layer_idx, offset=T, lte_state=state)
        return torch.cat(outs, 1)

    def _decode_step(self, x: torch.Tensor, real: torch.Tensor, state: dict) -> torch.Tensor:
        """One token per row (x [B, 1, H], real [B] bool); updates ``state`` in place; returns [B, 1, H]."""
        from fla.ops.lte import lte_cache_step, lte_decoding_one_step

        # Inside a CUDA graph every launch costs a few microseconds whatever its size, so this step keeps them few:
        # the router step is one kernel on CUDA (``fla.ops.lte.router_step``), no redundant casts.
        W1 = self.window_size + 1
        q, k, v = self._project(x)
        pos, n_real = state["pos"], state["real"]
        # the new token into the router ring (every state tensor keeps its storage from step to step, as CUDA-graph
        # replay needs; a pad enters as zeros), then the token m back, whose context is now complete, gets its score
        # in its attention ring slot. A pad's (or a not-yet-existing token's) slot holds -inf (``fla.ops.lte.cache``)
        # and gets -inf again, so only the slots of real tokens change.
        self.router.decode_step(state["router_kv"], state["router_valid"], k[:, 0], v[:, 0], real, pos,
                                state["score"], self.window_size)

        q_rot, k_rot = self.rotary(q, k, seqlen_offset=n_real)
        k_cache = state["k_cache"]
        lte_cache_step(k_cache, state["v_cache"], state["score"], state["sink"], state["valid"],
                       pos.remainder(W1), k_rot[:, 0].to(k_cache.dtype), v[:, 0].to(k_cache.dtype), real,
                       real & (n_real < self.sink_size), self.window_size)
        o = lte_decoding_one_step(q_rot.to(k_cache.dtype), k_cache, state["v_cache"], state["valid"])
        o = torch.where(real[:, None, None, None], o, 0).to(x.dtype)
        pos.add_(1)
        n_real.add_(real)
        return self.o_proj(o.flatten(-2))
