"""The one inference cache of every model family, and the generation mixin shared by the causal LMs.

``Cache`` is a ``transformers`` ``Cache`` subclass holding, per layer, a dict of named states, whatever the layer
type needs:

    recurrent_state   Gated DeltaNet: [N, H, K, V] float32
    conv_state        Gated DeltaNet: (q, k, v) short-convolution states, each [N, C, conv_size]
    attn_state        attention-type layers: a tuple of [N, T, ...] tensors grown along time (keys, values, ...)
    ffn_state         reserved (FLA's key)
    any other name    passed to ``update`` as a keyword and stored as given (e.g. compressed keys, eviction buffers)

and its own count of the tokens it has seen (``get_seq_length(layer_idx)``): a layer asking for its past length
before its own update gets its own count, never one already advanced by an earlier layer of the same forward
(FLA issue #747).

The class uses only the public surface of ``transformers.cache_utils.Cache`` that is the same in 4.57 and 5.x: the
base is constructed with an empty layer list and every method ``generate`` calls is overridden here, so no
transformers internals are version-sniffed. Recurrent states cannot be rolled back, so ``crop`` raises (assisted
decoding is refused by ``generate`` for stateful models anyway); beam search works through ``reorder_cache``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from transformers.cache_utils import Cache as HFCache
from transformers.generation import GenerationMixin

from fla.layers.utils import last_steps

STATE_NAMES = ("recurrent_state", "attn_state", "conv_state", "ffn_state")
ATTN_STATE_MODES = ("append", "replace")


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples / lists / dicts; other leaves are kept as they are."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _first_tensor(obj: Any) -> Optional[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        return _first_tensor(list(obj.values()))
    return None


class Cache(HFCache):
    """Per-layer state dicts plus per-layer seen-token counters; see the module docstring.

    Layers use it as FLA's layers do::

        state = cache[layer_idx] if len(cache) > layer_idx else None        # dict or None
        cache.update(recurrent_state=..., conv_state=(...), layer_idx=layer_idx, offset=q_len)

    Every tensor held in a state must have the batch (sequence) dimension first: ``reorder_cache``,
    ``batch_select_indices`` and ``batch_repeat_interleave`` index dimension 0 of all of them.
    """

    def __init__(self, seen_tokens: int = 0) -> None:
        # An empty layer list satisfies the base constructor of transformers 4.56+ and 5.x; the states live in
        # ``self.states`` and every base method that would read ``self.layers`` is overridden below.
        super().__init__(layers=[])
        self.states: List[Dict[str, Any]] = []
        self._seen_tokens: List[int] = []
        self._initial_seen_tokens = int(seen_tokens)

    # -------------------------------------------------------------------------------------------------------------
    # container protocol

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> Dict[str, Any]:
        if not 0 <= layer_idx < len(self.states):
            raise KeyError(f"Cache holds {len(self.states)} layers; there is no layer {layer_idx}")
        return self.states[layer_idx]

    def __iter__(self):
        return iter(self.states)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={len(self.states)}, seen_tokens={self._seen_tokens})"

    # -------------------------------------------------------------------------------------------------------------
    # writing

    def update(
        self,
        recurrent_state: Optional[torch.Tensor] = None,
        attn_state: Optional[Tuple[torch.Tensor, ...]] = None,
        conv_state: Optional[Any] = None,
        ffn_state: Optional[Any] = None,
        layer_idx: int = 0,
        offset: int = 1,
        cache_kwargs: Optional[Dict[str, Any]] = None,
        **extra_states: Any,
    ) -> Dict[str, Any]:
        """Store the states of layer ``layer_idx`` after it consumed ``offset`` more tokens; returns its state dict.

        ``recurrent_state``, ``conv_state``, ``ffn_state`` and extra keyword states replace the stored ones (None
        leaves a stored state as it is). ``attn_state`` (a tuple of [N, T, ...] tensors) is appended along time, or
        replaces the stored one with ``cache_kwargs={'attn_state_mode': 'replace'}``; with
        ``cache_kwargs={'window_size': w}`` only the last w time steps are kept.
        """
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset (the number of new tokens) must be an int >= 0, got {offset!r}")
        cache_kwargs = dict(cache_kwargs or {})
        window_size = cache_kwargs.get("window_size")
        mode = cache_kwargs.get("attn_state_mode", "append")
        if mode not in ATTN_STATE_MODES:
            raise ValueError(f"cache_kwargs['attn_state_mode']={mode!r}; choose one of {ATTN_STATE_MODES}")
        if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int)
                                        or window_size < 1):
            raise ValueError(f"cache_kwargs['window_size'] must be None or an int >= 1, got {window_size!r}")
        if attn_state is not None and not isinstance(attn_state, tuple):
            raise ValueError(f"attn_state must be a tuple of tensors [N, T, ...], got {type(attn_state).__name__}")

        while len(self.states) <= layer_idx:  # a layer seen for the first time (gaps: layers without state)
            self.states.append({name: None for name in STATE_NAMES})
            self._seen_tokens.append(self._initial_seen_tokens)
        state = self.states[layer_idx]
        if attn_state is not None:
            previous = state["attn_state"]
            if previous is not None and mode == "append":
                if len(previous) != len(attn_state):
                    raise ValueError(f"layer {layer_idx} stores {len(previous)} attention states, got "
                                     f"{len(attn_state)}")
                if window_size is not None:  # only what the window still needs goes into the new tensor
                    keep = max(window_size - attn_state[0].shape[1], 0)
                    previous = tuple(p[:, max(p.shape[1] - keep, 0):] for p in previous)
                attn_state = tuple(torch.cat([p, a], dim=1) for p, a in zip(previous, attn_state, strict=True))
            if window_size is not None:  # an owned copy: a view would keep a long prompt's keys alive
                attn_state = tuple(last_steps(a, window_size) for a in attn_state)
            state["attn_state"] = attn_state
        for name, value in (("recurrent_state", recurrent_state), ("conv_state", conv_state),
                            ("ffn_state", ffn_state), *extra_states.items()):
            if value is not None:
                state[name] = value
        self._seen_tokens[layer_idx] += offset
        return state

    # -------------------------------------------------------------------------------------------------------------
    # reading

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        """Number of tokens layer ``layer_idx`` has consumed (0 if it has no state yet)."""
        layer_idx = 0 if layer_idx is None else layer_idx
        return self._seen_tokens[layer_idx] if 0 <= layer_idx < len(self.states) else 0

    @property
    def seen_tokens(self) -> int:
        """Tokens seen by layer 0 (what ``generate`` reads as the cache length)."""
        return self.get_seq_length(0)

    def seen_tokens_per_layer(self) -> Tuple[int, ...]:
        """The seen-token count of every layer, in layer order (one int per entry of ``self.states``)."""
        return tuple(self._seen_tokens)

    def set_seen_tokens(self, counts: Sequence[int]) -> None:
        """Overwrite every layer's seen-token count; the states are left as they are.

        For code that advances the states without ``update`` (a CUDA-graph replay of a decode step,
        ``fla.models.graph_decode``): the host-side counts must follow the device-side states. ``counts`` holds one
        int >= 0 per layer (``len(self)`` of them)."""
        counts = tuple(counts)
        if len(counts) != len(self.states):
            raise ValueError(f"counts must hold one seen-token count per cached layer ({len(self.states)}), "
                             f"got {len(counts)}")
        for layer_idx, n in enumerate(counts):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"counts[{layer_idx}] must be an int >= 0, got {n!r}")
        self._seen_tokens = list(counts)

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> Tuple[int, int]:
        """(kv_length, kv_offset) of a full-attention layer's mask (transformers 5 passes the query length, 4.57 the
        cache positions)."""
        q_len = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.get_seq_length(layer_idx) + q_len, 0

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        """-1: no maximum length (recurrent states are fixed-size, attention states grow or roll)."""
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @property
    def max_cache_len(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        """Number of sequences the states hold, or -1 before the first update."""
        for state in self.states:
            t = _first_tensor(state)
            if t is not None:
                return t.shape[0]
        return -1

    @property
    def max_batch_size(self) -> int:
        return self.batch_size

    # The states are plain Python containers updated by replacement: no static shapes to compile against.
    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return len(self.states) > 0

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> List[bool]:
        return [False] * len(self.states)

    # -------------------------------------------------------------------------------------------------------------
    # batch manipulation (beam search, contrastive search)

    def _map_states(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.states = [_map_tensors(state, fn) for state in self.states]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the sequences of every state for beam search: sequence n becomes old sequence beam_idx[n]."""
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_states(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        """Forget every state (the cache can then be reused for a new batch)."""
        self.states = []
        self._seen_tokens = []

    def crop(self, max_length: int) -> None:
        raise ValueError("this cache holds recurrent states, which cannot be cropped back to an earlier length; "
                         "rerun the prefix instead (assisted / speculative decoding is not supported)")

    def offload(self, layer_idx: int, only_non_sliding: bool = True) -> None:  # states are small: never offloaded
        return None

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        return None

    # -------------------------------------------------------------------------------------------------------------
    # legacy format: a tuple of per-layer state dicts (FLA's)

    def to_legacy_cache(self) -> Tuple[Dict[str, Any], ...]:
        return tuple(dict(state) for state in self.states)

    @classmethod
    def from_legacy_cache(cls, past_key_values: Optional[Iterable[Dict[str, Any]]] = None,
                          seen_tokens: int = 0) -> "Cache":
        """A cache holding the given per-layer state dicts, each layer having seen ``seen_tokens`` tokens."""
        cache = cls(seen_tokens)
        if past_key_values is not None:
            for layer_idx, state in enumerate(past_key_values):
                if not isinstance(state, dict):
                    raise ValueError(f"a legacy cache is a sequence of per-layer state dicts; layer {layer_idx} "
                                     f"is a {type(state).__name__}")
                cache.states.append({**{name: None for name in STATE_NAMES}, **state})
                cache._seen_tokens.append(int(seen_tokens))
        return cache

    @classmethod
    def coerce(cls, past_key_values: Any) -> "Cache":
        """The cache a model continues from: ``past_key_values`` itself when it is one of ours; a new cache for
        None or an empty transformers cache (``generate`` creates a ``DynamicCache`` before the first forward);
        converted legacy state dicts. Anything else raises ``ValueError``."""
        if isinstance(past_key_values, Cache):
            return past_key_values
        if past_key_values is None:
            return cls()
        if isinstance(past_key_values, HFCache):
            if past_key_values.get_seq_length() == 0:
                return cls()
            raise ValueError(
                f"past_key_values is a non-empty {type(past_key_values).__name__}; fla models keep their states in "
                "fla.models.utils.Cache (pass the cache a previous forward returned, or None)"
            )
        if isinstance(past_key_values, (tuple, list)) and all(isinstance(s, dict) for s in past_key_values):
            return cls.from_legacy_cache(past_key_values)
        raise ValueError(f"past_key_values must be an fla.models.utils.Cache, None or a tuple of per-layer state "
                         f"dicts, got {type(past_key_values).__name__}")


class FLAGenerationMixin(GenerationMixin):
    """``generate`` support for the causal LMs: feeds only the tokens the cache has not seen yet.

    Works with the generation loops of transformers 4.57 (which pass ``cache_position``) and 5.x (which pass
    ``next_sequence_length``), without relying on either: the number of new tokens is read from the cache itself.
    The whole 2-D ``attention_mask`` (past and new columns) is forwarded; layers read the columns they need.
    """

    def prepare_inputs_for_generation(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[HFCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: bool = True,
        logits_to_keep: Optional[int] = None,
        next_sequence_length: Optional[int] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        model_inputs: Dict[str, Any] = {}
        if inputs_embeds is not None and past_length == 0:
            # the prompt is given as embeddings: use them for the first forward only
            model_inputs["inputs_embeds"] = inputs_embeds
            new_tokens = inputs_embeds.shape[1]
        else:
            if past_length > 0:
                if next_sequence_length is not None:
                    new_tokens = next_sequence_length
                else:
                    new_tokens = max(input_ids.shape[1] - past_length, 1)
                input_ids = input_ids[:, -new_tokens:]
            elif next_sequence_length is not None:
                input_ids = input_ids[:, -next_sequence_length:]
            new_tokens = input_ids.shape[1]
            model_inputs["input_ids"] = input_ids.contiguous()
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            model_inputs["position_ids"] = position_ids[..., -new_tokens:].contiguous()
        # generate-loop bookkeeping the models do not take
        for key in ("cache_position", "labels", "is_first_iteration"):
            kwargs.pop(key, None)
        model_inputs.update(
            past_key_values=past_key_values,
            use_cache=use_cache,
            attention_mask=attention_mask,
        )
        if logits_to_keep is not None:
            model_inputs["logits_to_keep"] = logits_to_keep
        for key, value in kwargs.items():
            model_inputs.setdefault(key, value)
        return model_inputs
