"""``Attention``: causal softmax attention (full or sliding window, grouped-query) with RoPE, FLA's parameter names.

Per token x (hidden size H), with HQ query heads and H_kv key/value heads of size hd = H / HQ:

    q, k, v = q_proj x, k_proj x, v_proj x                          split into heads ([B, T, HQ | H_kv, hd])
    q, k    = RoPE(q_norm q, k_norm k)                              (norms only with qk_norm; GPT-NeoX rotation)
    o       = softmax(q k^T * hd ** -0.5, causal [, window]) v      (``fla.ops.attn``)
    y       = o_proj o

``window_size = w`` means w keys per query, itself included (flash-attn's ``window=(w - 1, 0)``); None is full
causal attention. Positions count real tokens only: with left padding the first real token of each row is at
position 0, and with a cache a new token's position is the number of real tokens the layer has seen before it.

Cache (``fla.models.utils.Cache`` at ``layer_idx``): ``attn_state = (k, v)``, each [N, S, H_kv, hd] holding the
rotated keys and the values of each row, **left-aligned** (``fla.layers.utils.left_align``: left-padded, a row's r
real tokens are its last min(r, S) entries; what precedes them is padding or free room, never seen by a query);
S <= w for a sliding window, which keeps the cache bounded (``pad_cache_to_window`` makes S = w at once, for
CUDA-graph decoding: ``fla.models.graph_decode``). ``attn_lengths`` [N] int64 counts the real tokens each row has
seen (its next position). Three paths:

* no cached tokens yet (training, prefill): ``parallel_attn`` on the whole input, packed by ``cu_seqlens`` when a
  padding mask is given;
* one new token per row on a non-empty cache (decoding): ``attn_decoding_one_step`` against the cache, whose valid
  entries start at ``seq_start = max(S - r, 0)``;
* several new tokens on a non-empty cache (chunked prefill, e.g. feeding a continuation to a plain forward): an
  exact float32 reference over cache + new keys with an explicit mask (slow; fine for short continuations).

Full attention keeps every key, so its S is a **capacity**: a decoding step writes the new key and value in place,
into the free entry just before the row's valid ones (entry S - 1 - r), when the layer has room, and concatenates
them after the cache (a new tensor one entry longer, as a window cache does) when it has not. Room is decided on the
host without reading the device, as NSA does: the layer's seen-token count (the padded prompt length plus the
steps since; every row's r is at most that) must be below S. After a prefill the cache is exactly full, so steps
concatenate until ``reserve_cache(past_key_values, capacity)`` prepends free room; from then on every step up to
that length writes in place: no copy of the history (a long-context win on its own), and the same tensors every
step, as a captured CUDA graph needs. A step that does not store, or that records autograd history, concatenates.

Written this way, a row's valid entries are no longer in time order (the decoded tokens come first, newest first,
then the prompt in order). Full attention does not notice: every key carries its position in its rotation, and
softmax attention is a sum over a set of keys. Why this layout rather than another: the decoding op
(``fla.ops.attn.attn_decoding_one_step``) reads keys ``seq_start[b] .. S - 1`` of a tensor of S entries, so with
time order kept the newest key would have to be entry S - 1 of a fixed-shape buffer (a shift, i.e. a copy of the
cache, every step), and a start-aligned buffer like NSA's would need a per-row end in the op and its kernel. Growing
leftwards keeps the op, the kernel and the left-aligned contract of every other path (the chunked prefill takes
the cached keys as an unordered set, older than every new token). Sliding-window caches keep time order (their
window is "the last w entries") and concatenate as before.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

from fla.layers.utils import (
    check_mixer_inputs,
    left_align,
    left_aligned_mask,
    pad_input,
    padding_mask,
    unpad_input,
)
from fla.modules import RMSNorm, RotaryEmbedding
from fla.ops.utils.index import prepare_lens
from fla.utils import check_positive_int


def _masked_attention(q, k, v, q_pos, k_pos, k_valid, window_size, scale):
    """Float32 reference: q [N, L, HQ, D] at positions q_pos [N, L]; k [N, S, H, D], v [N, S, H, V] at positions
    k_pos [N, S], valid where k_valid [N, S]. A query sees valid keys with k_pos <= q_pos (and q_pos - k_pos < w).
    Queries without any visible key get 0. Returns [N, L, HQ, V] in q's dtype."""
    group = q.shape[2] // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("nqhd,nkhd->nhqk", q.float(), kf) * scale
    allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window_size is not None:
        allowed = allowed & (q_pos[:, :, None] - k_pos[:, None, :] < window_size)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("nhqk,nkhv->nqhv", p, vf).to(q.dtype)


def _write_before_valid(cache_k, cache_v, k_new, v_new, lengths, real):
    """Write one new key / value per row (k_new [N, H, hd]) in place into the free entry just before the row's
    ``lengths[n]`` valid ones, entry S - 1 - lengths[n]. Rows without a free entry, or with ``real[n] == 0`` (a
    padding token), are left alone: the decision is a mask on the device (no host read), and no write ever lands
    outside the tensors. Returns (cache_k, cache_v)."""
    S = cache_k.shape[1]
    slot = S - 1 - lengths.long()
    write = (slot >= 0) & (real != 0)
    slot = slot.clamp(min=0)  # rows not written store back what they hold
    rows = torch.arange(cache_k.shape[0], device=cache_k.device)
    for cache, new in ((cache_k, k_new), (cache_v, v_new)):
        cache[rows, slot] = torch.where(write[:, None, None], new.to(cache.dtype), cache[rows, slot])
    return cache_k, cache_v


class Attention(nn.Module):
    """Causal multi-head / grouped-query softmax attention with rotary positions; see the module docstring.

    Args:
        hidden_size: H, the model width.
        num_heads: HQ, the number of query heads; the head size is hd = hidden_size // num_heads.
        num_kv_heads: H_kv, the number of key/value heads (None: num_heads); must divide num_heads.
        qkv_bias: biases on q_proj / k_proj / v_proj.
        qk_norm: RMSNorm (``q_norm`` / ``k_norm``, over hd) of queries and keys before the rotation.
        window_size: None (full causal attention) or w >= 1 keys per query, itself included.
        rope_theta: the RoPE base.
        max_position_embeddings: accepted for FLA compatibility (angles are computed on the fly: no table limit).
        layer_idx: the index of this layer in the model (its slot in the cache).
        norm_eps: epsilon of the q/k norms.

    Parameters (FLA's state-dict keys): ``q_proj`` [HQ hd, H], ``k_proj`` / ``v_proj`` [H_kv hd, H], ``o_proj``
    [H, HQ hd] (+ biases of q/k/v with qkv_bias; ``q_norm.weight`` / ``k_norm.weight`` [hd] with qk_norm). The
    rotary module ``rotary`` holds only a non-persistent buffer.
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 32,
        num_kv_heads: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        window_size: Optional[int] = None,
        rope_theta: Optional[float] = 10000.0,
        max_position_embeddings: Optional[int] = None,
        layer_idx: Optional[int] = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (grouped-query attention)")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads} "
                             "(head size = hidden_size // num_heads)")
        if (hidden_size // num_heads) % 2:
            raise ValueError(f"the head size hidden_size // num_heads = {hidden_size // num_heads} must be even (RoPE)")
        if window_size is not None:
            check_positive_int("window_size", window_size)
        if rope_theta is None:
            rope_theta = 10000.0
        if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0):
            raise ValueError(f"layer_idx must be None or an int >= 0, got {layer_idx!r}")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_kv_groups = num_heads // num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.kv_dim = num_kv_heads * self.head_dim
        self.qkv_bias = bool(qkv_bias)
        self.qk_norm = bool(qk_norm)
        self.window_size = window_size
        self.rope_theta = float(rope_theta)
        self.max_position_embeddings = max_position_embeddings
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=self.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, self.kv_dim, bias=self.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, self.kv_dim, bias=self.qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=norm_eps)
        self.rotary = RotaryEmbedding(dim=self.head_dim, base=self.rope_theta)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window_size={self.window_size}, qk_norm={self.qk_norm}, layer_idx={self.layer_idx}")

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
            attention_mask: [B, T'] 0/1 padding mask (1 = token) or None; its last T columns are used (T' >= T).
                Padded tokens get no position, are never attended to, and their output is zero. Cannot be combined
                with ``cu_seqlens`` unless it is all ones. In cached decoding, a row's padding must come before its
                real tokens (left padding, as ``generate`` makes it).
            past_key_values: an ``fla.models.utils.Cache`` or None. The layer attends to its cached keys (if any)
                and, with ``use_cache``, stores the new ones there.
            use_cache: store the rotated keys and the values in ``past_key_values``.
            output_attentions: accepted for API compatibility; no attention weights are returned (None).
            kwargs: ``cu_seqlens`` [N + 1] for B = 1 inputs that pack N sequences (the cache then holds N rows);
                other keyword arguments (e.g. ``position_ids``) are ignored.

        Returns:
            (output [B, T, H] in the input's dtype, None, past_key_values)
        """
        check_mixer_inputs(hidden_states, self.hidden_size, past_key_values, self.layer_idx)
        if output_attentions:
            warnings.warn("Attention does not return attention weights; output_attentions is ignored", stacklevel=2)
        batch_size, q_len, _ = hidden_states.shape
        cu_seqlens = kwargs.get("cu_seqlens")

        mask = padding_mask(attention_mask, batch_size, q_len, cu_seqlens)

        cached = None
        if past_key_values is not None and len(past_key_values) > self.layer_idx:
            state = past_key_values[self.layer_idx]
            if state.get("attn_state") is not None:
                lengths = state.get("attn_lengths")
                if lengths is None:  # a legacy cache without counts: every cached token is taken as real
                    lengths = torch.full((state["attn_state"][0].shape[0],), past_key_values.get_seq_length(
                        self.layer_idx), dtype=torch.long, device=hidden_states.device)
                cached = (state["attn_state"][0], state["attn_state"][1], lengths)
        store = use_cache and past_key_values is not None

        if cached is not None and q_len == 1 and cu_seqlens is None and self._can_decode(mask, cached[2]):
            o, past_key_values = self._decode(hidden_states, mask, cached, past_key_values, store)
            return self.o_proj(o.flatten(-2)), None, past_key_values

        indices = None
        if mask is not None:
            hidden_states, indices, cu_seqlens, _ = unpad_input(hidden_states, mask)
        q, k, v = self._project(hidden_states)
        if cu_seqlens is not None:
            lens = prepare_lens(cu_seqlens.long())
        else:
            lens = torch.full((hidden_states.shape[0],), q_len, dtype=torch.long, device=hidden_states.device)

        if cached is None:
            q, k = self.rotary(q, k, seqlen_offset=0, cu_seqlens=cu_seqlens)
            from fla.ops.attn import parallel_attn  # not at the top: `import fla` stays free of kernel modules
            o = parallel_attn(q, k, v, window_size=self.window_size, cu_seqlens=cu_seqlens)
            if store:
                if cu_seqlens is not None:  # store the rows left-aligned: [N, max len]
                    aligned = left_aligned_mask(lens, int(lens.max()) if lens.numel() else 0)
                    k_store, v_store = left_align(k[0], aligned), left_align(v[0], aligned)
                else:
                    k_store, v_store = k, v
                past_key_values.update(attn_state=(k_store, v_store), layer_idx=self.layer_idx, offset=q_len,
                                       cache_kwargs={"window_size": self.window_size}, attn_lengths=lens)
        else:
            o = self._chunked_prefill(q, k, v, lens, cu_seqlens, cached, past_key_values, store, q_len)

        o = self.o_proj(o.flatten(-2))
        if indices is not None:
            o = pad_input(o, indices, batch_size, q_len)
        return o, None, past_key_values

    def pad_cache_to_window(self, past_key_values: Any) -> None:
        """Left-pad this sliding-window layer's cached keys and values to ``window_size`` time steps.

        A window cache grows by one entry per decode step until it holds ``window_size``; from then on every step
        keeps its shape [N, window_size, H_kv, hd], as a CUDA-graph replay needs (``fla.models.graph_decode``).
        The new entries are zeros before each row's valid ones (which start at S - attn_lengths), so no query ever
        sees them and the layer's outputs are unchanged. Does nothing for full attention (whose cache always
        grows), for a layer without cached keys, or for a cache that already spans the window.
        """
        if self.window_size is None or past_key_values is None or len(past_key_values) <= self.layer_idx:
            return
        state = past_key_values[self.layer_idx]
        kv = state.get("attn_state")
        if kv is None or kv[0].shape[1] >= self.window_size:
            return
        k, v = kv
        lengths = state.get("attn_lengths")
        if lengths is None:  # a legacy cache without counts: every cached token is real (as ``forward`` reads it)
            lengths = torch.full((k.shape[0],), past_key_values.get_seq_length(self.layer_idx), dtype=torch.long,
                                 device=k.device)
        pad = self.window_size - k.shape[1]
        k, v = (torch.cat([x.new_zeros(x.shape[0], pad, *x.shape[2:]), x], 1) for x in (k, v))
        past_key_values.update(attn_state=(k, v), layer_idx=self.layer_idx, offset=0,
                               cache_kwargs={"window_size": self.window_size, "attn_state_mode": "replace"},
                               attn_lengths=lengths)

    # -------------------------------------------------------------------------------------------------------------

    def _project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _check_cache_rows(self, n: int, cached) -> None:
        if cached[0].shape[0] != n:
            raise ValueError(f"the cache of layer {self.layer_idx} holds {cached[0].shape[0]} sequences, but the input "
                             f"has {n}")

    @staticmethod
    def _can_decode(mask: Optional[torch.Tensor], lengths: torch.Tensor) -> bool:
        """The one-step path keeps the cache left-aligned only if a padded new token follows no real token."""
        if mask is None:
            return True
        pad = mask[:, -1] == 0
        return not bool((pad & (lengths.to(pad.device) > 0)).any())

    def _decode(self, hidden_states, mask, cached, past_key_values, store):
        """One new token per row (B rows = the cache's rows) against the left-aligned cache: written in place when
        the cache has room (full attention, see the module docstring), concatenated after it otherwise."""
        cache_k, cache_v, lengths = cached
        self._check_cache_rows(hidden_states.shape[0], cached)
        q, k, v = self._project(hidden_states)
        q, k = self.rotary(q, k, seqlen_offset=lengths)
        real = torch.ones_like(lengths) if mask is None else (mask[:, -1] != 0).long()
        new_lengths = lengths + real
        if store and self._in_place(past_key_values, cache_k, 1, k):
            all_k, all_v = _write_before_valid(cache_k, cache_v, k[:, 0], v[:, 0], lengths, real)
            past_key_values.update(attn_state=(all_k, all_v), layer_idx=self.layer_idx, offset=1,
                                   cache_kwargs={"attn_state_mode": "replace"}, attn_lengths=new_lengths)
        elif store:
            state = past_key_values.update(attn_state=(k, v), layer_idx=self.layer_idx, offset=1,
                                           cache_kwargs={"window_size": self.window_size}, attn_lengths=new_lengths)
            all_k, all_v = state["attn_state"]
        else:
            all_k, all_v = torch.cat([cache_k, k], 1), torch.cat([cache_v, v], 1)
            if self.window_size is not None:
                all_k, all_v = all_k[:, -self.window_size:], all_v[:, -self.window_size:]
        seq_start = (all_k.shape[1] - new_lengths).clamp(min=0)
        from fla.ops.attn import attn_decoding_one_step
        o = attn_decoding_one_step(q, all_k, all_v, window_size=self.window_size, seq_start=seq_start)
        if mask is not None:  # a padded query may have no key at all: zero output, as on the parallel path
            o = torch.where(real.bool()[:, None, None, None], o, torch.zeros_like(o))
        return o, past_key_values

    def _in_place(self, past_key_values, cache_k: torch.Tensor, new_tokens: int, k_new: torch.Tensor) -> bool:
        """Whether ``new_tokens`` more tokens per row can be written into this full-attention layer's cache tensors
        in place. Decided on the host, from the layer's seen-token count (an upper bound on every row's length):
        never a device read."""
        if self.window_size is not None:
            return False
        seen = past_key_values.get_seq_length(self.layer_idx)
        if seen <= 0 or seen + new_tokens > cache_k.shape[1]:  # no count (a legacy cache), or no room
            return False
        if torch.is_grad_enabled() and (k_new.requires_grad or cache_k.requires_grad):
            return False  # an in-place write would corrupt tensors that autograd saved
        # inference tensors can only be written inside inference_mode
        return not cache_k.is_inference() or torch.is_inference_mode_enabled()

    def reserve_cache(self, past_key_values: Any, capacity: int) -> int:
        """Grow this full-attention layer's cached keys and values to hold ``capacity`` tokens per row, so that the
        decoding steps up to that length write in place and never reallocate (a serving loop, or a CUDA graph
        capturing the step, then sees the same tensors every step; ``fla.models.graph_decode``). Free room is
        prepended (zeros before each row's valid entries, seen by no query), so the outputs do not change.

        A step writes in place while the layer's seen-token count (``past_key_values.get_seq_length(layer_idx)``:
        the padded prompt length plus the tokens decoded since) stays within the capacity, so reserve for that
        count: the padded prompt length plus the tokens still to be generated. Same contract as
        ``NativeSparseAttention.reserve_cache``.

        Args:
            past_key_values: the ``fla.models.utils.Cache`` this layer has stored its prefill in.
            capacity: int >= 1, tokens per row to make room for.

        Returns:
            the capacity now held (>= capacity; an already larger cache is left as it is).
        """
        check_positive_int("capacity", capacity)
        if self.window_size is not None:
            raise ValueError(f"reserve_cache is for full attention (window_size=None); this layer has window_size="
                             f"{self.window_size}, whose cache never holds more than {self.window_size} entries "
                             "(pad_cache_to_window gives it that shape at once)")
        if self.layer_idx is None:
            raise ValueError("layer_idx must be set (the layer's slot in the cache) to reserve its cache")
        state = past_key_values[self.layer_idx] if past_key_values is not None and \
            len(past_key_values) > self.layer_idx else None
        if state is None or state.get("attn_state") is None:
            raise ValueError(f"past_key_values holds no state of layer {self.layer_idx}: run the prefill with "
                             "use_cache=True first (the cache's rows, dtype and device come from it)")
        k, v = state["attn_state"]
        if k.shape[1] >= capacity:
            return k.shape[1]
        pad = capacity - k.shape[1]
        with torch.no_grad():  # a decoding cache: no autograd history, so later steps may write in place
            k, v = (torch.cat([x.new_zeros(x.shape[0], pad, *x.shape[2:]), x], 1) for x in (k, v))
        past_key_values.update(attn_state=(k, v), layer_idx=self.layer_idx, offset=0,
                               cache_kwargs={"attn_state_mode": "replace"}, attn_lengths=state.get("attn_lengths"))
        return capacity

    def _chunked_prefill(self, q, k, v, lens, cu_seqlens, cached, past_key_values, store, q_len):
        """Several new tokens per row on a non-empty cache: an exact float32 reference (cache + new keys).

        q/k/v are packed [1, total, ...] with ``cu_seqlens`` (N sequences = the cache's rows) or [N, T, ...]."""
        cache_k, cache_v, lengths = cached
        n = lens.numel()
        self._check_cache_rows(n, cached)
        q, k = self.rotary(q, k, seqlen_offset=lengths, cu_seqlens=cu_seqlens)
        width = q.shape[1] if cu_seqlens is None else (int(lens.max()) if n else 0)
        new_valid = left_aligned_mask(lens, width)
        if cu_seqlens is not None:
            q, k, v = (left_align(x[0], new_valid) for x in (q, k, v))
        S = cache_k.shape[1]
        cached_real = lengths.clamp(max=S)
        old_valid = left_aligned_mask(cached_real, S)
        # all keys of a row, left-aligned again: its cached real tokens, then its new ones
        total_real = cached_real + lens
        keys_valid = left_aligned_mask(total_real, S + width)
        both_valid = torch.cat([old_valid, new_valid], 1)
        all_k = left_align(torch.cat([cache_k, k], 1)[both_valid], keys_valid)
        all_v = left_align(torch.cat([cache_v, v], 1)[both_valid], keys_valid)
        cols = torch.arange(S + width, device=q.device)
        k_pos = (lengths + lens)[:, None] - (S + width - cols)[None, :]
        q_cols = torch.arange(width, device=q.device)
        q_pos = (lengths + lens)[:, None] - (width - q_cols)[None, :]
        o = _masked_attention(q, all_k, all_v, q_pos, k_pos, keys_valid, self.window_size, self.head_dim ** -0.5)
        if store:
            if self._in_place(past_key_values, cache_k, q_len, k):
                # the reserved tensors keep their addresses: every row's valid entries lie in the last S columns
                cache_k.copy_(all_k[:, -S:])
                cache_v.copy_(all_v[:, -S:])
                all_k, all_v = cache_k, cache_v
            past_key_values.update(attn_state=(all_k, all_v), layer_idx=self.layer_idx, offset=q_len,
                                   cache_kwargs={"window_size": self.window_size, "attn_state_mode": "replace"},
                                   attn_lengths=lengths + lens)
        if cu_seqlens is not None:
            o = o[new_valid][None]
        return o
