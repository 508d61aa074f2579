"""``NativeSparseAttention``: NSA token mixer (compressed + selected blocks + sliding window, gated), with RoPE.

Per token x (hidden size H), with HQ query heads and H_kv key/value heads of size D (``head_dim``):

    q, k, v = q_proj x, k_proj x, v_proj x                  split into heads ([B, T, HQ | H_kv, D])
    g_cmp, g_slc, g_swa = sigmoid(g_proj x) as [.., HQ, 3]   (per query head, in this order)
    q, k    = RoPE(q, k)                                     (GPT-NeoX rotation, base ``rope_theta``)
    o       = parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, block_counts, block_size, window_size)
    y       = o_proj o

Positions count real tokens only (left padding gets no position), as in ``fla.layers.attn``; blocks are counted
from each sequence's first real token, so a padded batch equals the same sequences packed with ``cu_seqlens``.

Cache (``fla.models.utils.Cache`` at ``layer_idx``), per row n of the batch:

* ``attn_state = (k, v)``, each [N, C, H_kv, D]: the rotated keys and the values, **start-aligned** (row n's
  tokens at 0 .. attn_lengths[n] - 1, zeros after), C a multiple of ``block_size`` grown geometrically, so a
  decoding step writes one slot instead of copying the history;
* ``attn_lengths`` [N] int64: the real tokens each row has seen (the next position);
* ``nsa_cmp_state = (k_cmp, v_cmp)``, each [N, C / block_size, H_kv, D]: the mean-pooled complete blocks (block c
  valid for c < attn_lengths[n] // block_size), written once when the block completes, never re-pooled.

Three paths: no cached tokens (training, prefill: ``parallel_nsa``, packed by ``cu_seqlens`` with a padding mask);
one new token per row (``nsa_cache_append_one`` + ``nsa_decoding_one_step``: O(history / block_size +
block_counts * block_size + window_size) per step); several new tokens on a non-empty cache (chunked prefill:
``parallel_nsa`` with a ``(cu_q, cu_k)`` pair over the cached + new keys). The cached paths are inference-only: the
stored tensors are detached, so no gradient flows into earlier tokens through the cache.

The one-token step reads no device value on the host (no synchronisation with the GPU): its capacity check uses a
host-side bound, the cache's seen-token count of the layer (every row holds at most that many tokens; left padding
only makes rows shorter), and padding rows are masked on the device. When the bound exceeds the capacity the
tensors grow (a copy, amortised by geometric growth); ``reserve_cache`` grows them once up front, after which every
step writes in place into the same tensors. The prefill and chunked-prefill paths read lengths on the host (to size
the appended and packed tensors).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

from fla.layers.utils import check_mixer_inputs, check_padding_mask, pad_input, padding_mask, unpad_input
from fla.modules import RotaryEmbedding
from fla.ops.utils.index import prepare_cu_seqlens_from_lens, prepare_lens, prepare_position_ids
from fla.utils import check_positive_int


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


class NativeSparseAttention(nn.Module):
    """Native Sparse Attention with rotary positions; see the module docstring.

    Args:
        hidden_size: H, the model width.
        num_heads: HQ, the number of query heads.
        num_kv_heads: H_kv, the number of key/value heads (None: num_heads); must divide num_heads (any group size).
        head_dim: D, the size of every head (independent of hidden_size; even, for RoPE).
        qkv_bias: biases on q_proj / k_proj / v_proj (False in every paper config).
        block_size: tokens per block (compression stride and selection granularity).
        block_counts: blocks selected per query and kv head.
        window_size: keys of the sliding-window branch, the query itself included (0 or None: no window branch).
        rope_theta: the RoPE base.
        max_position_embeddings: accepted for FLA compatibility (angles are computed on the fly).
        layer_idx: the index of this layer in the model (its slot in the cache).

    Parameters (the reference's state-dict keys): ``q_proj`` [HQ D, H], ``k_proj`` / ``v_proj`` [H_kv D, H],
    ``g_proj`` [3 HQ, H], ``o_proj`` [H, HQ D], none with a bias (unless ``qkv_bias``).
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 64,
        num_kv_heads: Optional[int] = 4,
        head_dim: int = 64,
        qkv_bias: bool = False,
        block_size: int = 64,
        block_counts: int = 16,
        window_size: Optional[int] = 512,
        rope_theta: Optional[float] = 10000.0,
        max_position_embeddings: Optional[int] = None,
        layer_idx: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (grouped-query attention)")
        check_positive_int("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even (RoPE)")
        check_positive_int("block_size", block_size)
        check_positive_int("block_counts", block_counts)
        if window_size is None:
            window_size = 0
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"window_size must be None, 0 (no window branch) or an int >= 1, got {window_size!r}")
        if rope_theta is None:
            rope_theta = 10000.0
        if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0):
            raise ValueError(f"layer_idx must be None or an int >= 0, got {layer_idx!r}")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_kv_groups = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.kv_dim = num_kv_heads * head_dim
        self.qkv_bias = bool(qkv_bias)
        self.block_size = block_size
        self.block_counts = block_counts
        self.window_size = window_size
        self.rope_theta = float(rope_theta)
        self.max_position_embeddings = max_position_embeddings
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=self.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, self.kv_dim, bias=self.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, self.kv_dim, bias=self.qkv_bias)
        self.g_proj = nn.Linear(hidden_size, num_heads * 3, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(dim=head_dim, base=self.rope_theta)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}, block_counts={self.block_counts}, window_size={self.window_size}, "
                f"layer_idx={self.layer_idx}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Any] = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, None, Optional[Any]]:
        """Mix the tokens of ``hidden_states`` [B, T, H].

        Args:
            attention_mask: [B, T'] 0/1 padding mask (1 = token) or None; its last T columns are used. Padded tokens
                get no position, are never attended to and output zero. Not combinable with ``cu_seqlens``.
            past_key_values: an ``fla.models.utils.Cache`` or None; with ``use_cache`` the layer stores its state
                there (see the module docstring).
            kwargs: ``cu_seqlens`` [N + 1] for B = 1 inputs packing N sequences (the cache then holds N rows).

        Returns:
            (output [B, T, H] in the input's dtype, None, past_key_values)
        """
        check_mixer_inputs(hidden_states, self.hidden_size, past_key_values, self.layer_idx)
        if output_attentions:
            warnings.warn("NativeSparseAttention does not return attention weights; output_attentions is ignored",
                          stacklevel=2)
        batch_size, q_len, _ = hidden_states.shape
        cu_seqlens = kwargs.get("cu_seqlens")

        cached = self._cached_state(past_key_values)
        store = use_cache and past_key_values is not None

        if cached is not None and q_len == 1 and cu_seqlens is None:
            # the mask's last column is used on the device as it is: padding_mask's "no padding at all?" test
            # would read it on the host
            mask = None if attention_mask is None else check_padding_mask(attention_mask, batch_size, q_len)
            o = self._decode(hidden_states, mask, cached, past_key_values, store)
            return self.o_proj(o.flatten(-2)), None, past_key_values

        mask = padding_mask(attention_mask, batch_size, q_len, cu_seqlens)
        indices = None
        if mask is not None:
            hidden_states, indices, cu_seqlens, _ = unpad_input(hidden_states, mask)
        q, k, v, gates = self._project(hidden_states)
        if cu_seqlens is not None:
            lens = prepare_lens(cu_seqlens.long())
        else:
            lens = torch.full((hidden_states.shape[0],), q_len, dtype=torch.long, device=hidden_states.device)

        if cached is None:
            q, k = self.rotary(q, k, seqlen_offset=0, cu_seqlens=cu_seqlens)
            o = self._attend(q, k, v, gates, cu_seqlens)
            if store:
                zeros = torch.zeros_like(lens)
                state = self._empty_state(lens.numel(), k)
                state = self._append(state, k, v, zeros, lens, cu_seqlens)
                self._store(past_key_values, state, lens, q_len)
        else:
            o = self._chunked_prefill(q, k, v, gates, lens, cu_seqlens, cached, past_key_values, store, q_len)

        o = self.o_proj(o.flatten(-2))
        if indices is not None:
            o = pad_input(o, indices, batch_size, q_len)
        return o, None, past_key_values

    # -------------------------------------------------------------------------------------------------------------

    def _project(self, x: torch.Tensor):
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        gates = self.g_proj(x).unflatten(-1, (self.num_heads, 3)).sigmoid().unbind(-1)  # (cmp, slc, swa)
        return q, k, v, gates

    def _op_kwargs(self):
        return dict(block_counts=self.block_counts, block_size=self.block_size, window_size=self.window_size)

    def _attend(self, q, k, v, gates, cu_seqlens):
        from fla.ops.nsa import parallel_nsa  # not at the top: `import fla` stays free of kernel modules
        g_cmp, g_slc, g_swa = gates
        return parallel_nsa(q, k, v, g_cmp, g_slc, g_swa if self.window_size else None, cu_seqlens=cu_seqlens,
                            **self._op_kwargs())

    def _cached_state(self, past_key_values):
        """(k, v, k_cmp, v_cmp, lengths) of this layer in ``past_key_values``, or None when it holds nothing yet."""
        if past_key_values is None or len(past_key_values) <= self.layer_idx:
            return None
        state = past_key_values[self.layer_idx]
        if state.get("attn_state") is None:
            return None
        if state.get("nsa_cmp_state") is None or state.get("attn_lengths") is None:
            raise ValueError(f"the cache of layer {self.layer_idx} holds no NSA state (attn_lengths, nsa_cmp_state); "
                             "was it filled by another layer type?")
        return (*state["attn_state"], *state["nsa_cmp_state"], state["attn_lengths"])

    def _empty_state(self, n: int, like: torch.Tensor):
        C = self.block_size
        k = like.new_zeros(n, C, self.num_kv_heads, self.head_dim)
        kc = like.new_zeros(n, 1, self.num_kv_heads, self.head_dim)
        return (k, k.clone(), kc, kc.clone())

    def _grow(self, state, capacity: int):
        """The state's tensors with room for ``capacity`` tokens (rounded up to block_size), zero-filled after the
        old capacity; the given tensors when they already have it."""
        k, v, kc, vc = state
        C = k.shape[1]
        new_c = _round_up(capacity, self.block_size)
        if new_c <= C:
            return state
        pad = new_c - C
        k = torch.cat([k, k.new_zeros(k.shape[0], pad, *k.shape[2:])], 1)
        v = torch.cat([v, v.new_zeros(v.shape[0], pad, *v.shape[2:])], 1)
        nb = new_c // self.block_size - kc.shape[1]
        kc = torch.cat([kc, kc.new_zeros(kc.shape[0], nb, *kc.shape[2:])], 1)
        vc = torch.cat([vc, vc.new_zeros(vc.shape[0], nb, *vc.shape[2:])], 1)
        return k, v, kc, vc

    def _reserve(self, state, needed: int, copy: bool):
        """The state with a capacity of at least ``needed`` tokens (grown by half at least, so appends amortise);
        ``copy``: never write into the given tensors (a forward that does not store)."""
        C = state[0].shape[1]
        if needed > C:
            return self._grow(state, max(needed, C + C // 2))
        if copy:
            return tuple(t.clone() for t in state)
        return tuple(state)

    def reserve_cache(self, past_key_values, capacity: int) -> int:
        """Grow this layer's cached tensors to hold at least ``capacity`` tokens per row (rounded up to
        ``block_size``), so that the decoding steps up to that length write in place and never reallocate (a
        serving loop, or a CUDA graph capturing the step, then sees the same tensors every step).

        The decode step grows the tensors when the layer's seen-token count (``past_key_values.get_seq_length``:
        the padded prompt length plus the tokens decoded since) would pass the capacity, so reserve for that count:
        the padded prompt length plus the tokens still to be generated.

        Args:
            past_key_values: the ``fla.models.utils.Cache`` this layer has stored its prefill in.
            capacity: int >= 1, tokens per row to make room for.

        Returns:
            the capacity now held (>= capacity; an already larger cache is left as it is).
        """
        check_positive_int("capacity", capacity)
        if self.layer_idx is None:
            raise ValueError("layer_idx must be set (the layer's slot in the cache) to reserve its cache")
        cached = self._cached_state(past_key_values)
        if cached is None:
            raise ValueError(f"past_key_values holds no state of layer {self.layer_idx}: run the prefill with "
                             "use_cache=True first (the cache's rows, dtype and device come from it)")
        state = self._grow(cached[:4], capacity)
        if state[0] is not cached[0]:
            self._store(past_key_values, state, None, 0)
        return state[0].shape[1]

    def _append(self, state, k_new, v_new, lengths, lens, cu_seqlens, copy: bool = False):
        """Write ``lens[n]`` new tokens of each row after its ``lengths[n]`` cached ones; pool completed blocks.
        k_new / v_new: packed [1, total, ...] with ``cu_seqlens`` or [N, L, ...] (all L tokens real).
        Prefill paths only: the capacity check and the pooling read lengths on the host."""
        from fla.ops.nsa import append_compressed_blocks
        new_lengths = lengths + lens
        needed = int(new_lengths.max()) if new_lengths.numel() else 0
        k, v, kc, vc = self._reserve(state, needed, copy)
        n = lens.numel()
        if cu_seqlens is not None:
            rows = torch.repeat_interleave(torch.arange(n, device=lens.device), lens, output_size=k_new.shape[1])
            offset = prepare_position_ids(cu_seqlens.long())
            k_new, v_new = k_new[0], v_new[0]
        else:
            L = k_new.shape[1]
            rows = torch.arange(n, device=lens.device).repeat_interleave(L)
            offset = torch.arange(L, device=lens.device).repeat(n)
            k_new, v_new = k_new.flatten(0, 1), v_new.flatten(0, 1)
        pos = lengths[rows] + offset
        k.index_put_((rows, pos), k_new.detach().to(k.dtype))
        v.index_put_((rows, pos), v_new.detach().to(v.dtype))
        kc, vc = append_compressed_blocks(kc, vc, k, v, lengths, new_lengths, self.block_size)
        return k, v, kc, vc

    def _store(self, past_key_values, state, lengths, offset: int) -> None:
        k, v, kc, vc = state
        past_key_values.update(attn_state=(k, v), layer_idx=self.layer_idx, offset=offset,
                               cache_kwargs={"attn_state_mode": "replace"}, attn_lengths=lengths,
                               nsa_cmp_state=(kc, vc))

    def _check_cache_rows(self, n: int, cached) -> None:
        if cached[0].shape[0] != n:
            raise ValueError(f"the cache of layer {self.layer_idx} holds {cached[0].shape[0]} sequences, but the input "
                             f"has {n}")

    def _length_bound(self, past_key_values, lengths: torch.Tensor, new_tokens: int) -> int:
        """A host-side upper bound on every row's length after ``new_tokens`` more tokens: the layer's seen-token
        count (padded prompt length + steps) plus ``new_tokens``, read without a device sync."""
        seen = past_key_values.get_seq_length(self.layer_idx)
        if seen <= 0:  # a state without a count (a legacy cache converted with seen_tokens=0): read the lengths
            return (int(lengths.max()) if lengths.numel() else 0) + new_tokens
        return seen + new_tokens

    def _decode(self, hidden_states, mask, cached, past_key_values, store):
        """One new token per row against the cache, with no host read of a device value (see the module
        docstring). ``mask``: the checked [N, 1] last mask column or None; a row whose column is 0 is padding (not
        written, its length kept, zero output)."""
        from fla.ops.nsa import nsa_cache_append_one, nsa_decoding_one_step
        self._check_cache_rows(hidden_states.shape[0], cached)
        lengths = cached[4].to(hidden_states.device)
        q, k, v, gates = self._project(hidden_states)
        q, k = self.rotary(q, k, seqlen_offset=lengths)
        state = self._reserve(cached[:4], self._length_bound(past_key_values, lengths, 1), copy=not store)
        real = None if mask is None else mask[:, -1] != 0
        nsa_cache_append_one(*state, k[:, 0], v[:, 0], lengths, real, self.block_size)
        new_lengths = lengths + (1 if real is None else real.to(lengths.dtype))
        g_cmp, g_slc, g_swa = gates
        o = nsa_decoding_one_step(q, *state, new_lengths, g_cmp, g_slc, g_swa if self.window_size else None,
                                  **self._op_kwargs())
        if real is not None:  # a padded token outputs zero, as on the parallel path
            o = o * real[:, None, None, None].to(o.dtype)
        if store:
            self._store(past_key_values, state, new_lengths, 1)
        return o

    def _chunked_prefill(self, q, k, v, gates, lens, cu_seqlens, cached, past_key_values, store, q_len):
        """Several new tokens per row on a non-empty cache: append, then attend over cached + new keys.
        q/k/v are packed [1, total, ...] with ``cu_seqlens`` (N rows = the cache's rows) or [N, T, ...]."""
        from fla.ops.nsa import parallel_nsa
        n = lens.numel()
        self._check_cache_rows(n, cached)
        lengths = cached[4].to(q.device)
        q, k = self.rotary(q, k, seqlen_offset=lengths, cu_seqlens=cu_seqlens)
        state = self._append(cached[:4], k, v, lengths, lens, cu_seqlens, copy=not store)
        new_lengths = lengths + lens
        valid = torch.arange(state[0].shape[1], device=q.device)[None] < new_lengths[:, None]
        k_all, v_all = state[0][valid][None], state[1][valid][None]
        cu_q = prepare_cu_seqlens_from_lens(lens, torch.int64)
        cu_k = prepare_cu_seqlens_from_lens(new_lengths, torch.int64)
        dense = cu_seqlens is None
        if dense:
            q = q.flatten(0, 1)[None]
            gates = tuple(g.flatten(0, 1)[None] for g in gates)
        g_cmp, g_slc, g_swa = gates
        o = parallel_nsa(q, k_all.to(q.dtype), v_all.to(q.dtype), g_cmp, g_slc, g_swa if self.window_size else None,
                         cu_seqlens=(cu_q, cu_k), **self._op_kwargs())
        if dense:
            o = o[0].unflatten(0, (n, q_len))
        if store:
            self._store(past_key_values, state, new_lengths, q_len)
        return o
