"""Whole-model decode steps captured once and replayed as one graph (a CUDA graph on the GPU).

Eager decoding is host-bound: a decode step of a 24-layer model is Python plus about 150 kernel launches a layer,
25-60 ms on an H200 whatever the cache, so fixed-size caches (Gated DeltaNet, sliding-window attention, LTE) show
no advantage over a growing one. ``GraphDecoder`` captures one step
``model(ids [B, 1], past_key_values=cache, use_cache=True)`` and replays it::

    out = model(prompt, attention_mask=mask, use_cache=True)            # prefill (left padding is fine)
    decoder = GraphDecoder(model, out.past_key_values).capture()
    logits = decoder.step(next_ids)                                       # [B, 1, vocab], as the eager call

The step is treated as a pure function ``(ids, *states) -> (logits, *new_states)``, where ``states`` are the
tensors the cache holds, in layer order. The static inputs of the captured graph are the cache's own state
tensors; at the end of the captured region every new state is copied into its static input (``static.copy_(new)``;
states that a layer updates in place, such as LTE's, need no copy), so the cache always holds the current state at
fixed addresses and replays chain. Positions come from the cache's device tensors (``attn_lengths``, LTE's ``pos``
/ ``real``); every new token is real (no attention mask). The cache's host-side seen-token counts are advanced by
the decoder after each replay, so ``cache.get_seq_length()`` stays right and eager calls on the same cache can
continue after graph steps (and graph steps after eager ones: the decoder copies states an eager call replaced back
into its static buffers).

Caches must keep their shape from step to step. Gated DeltaNet and LTE caches do; a sliding-window ``Attention``
cache still filling is first left-padded to the window with entries no query sees (``Attention.pad_cache_to_window``).
Full attention and NSA caches grow with the sequence: they are captured only when the decoder is given
``max_length``, the number of tokens a row may reach (the cache's seen-token count, i.e. the padded prompt length,
plus the tokens still to be generated). ``capture()`` then gives every such layer that capacity
(``Attention.reserve_cache`` / ``NativeSparseAttention.reserve_cache``: room prepended, resp. appended, once), after
which their decode steps write the new key and value in place, at fixed addresses, with no host read; their lengths
(``attn_lengths``, a new small tensor each step) are copied into their static buffer like any replaced state. A step
that would take the cache past ``max_length`` raises before replaying (a host-side check on the seen-token counts,
which the decoder advances itself), so a replay never runs out of the reserved room. Without ``max_length`` such
models are refused with a ``ValueError`` naming the layer and its state, as is any state whose shape changes in a
dry-run step.

Capture backends (``backend=``): 'cuda' (``torch.cuda.CUDAGraph``; default for CUDA caches) and 'fx' (the default
elsewhere): ``torch.fx.experimental.proxy_tensor.make_fx`` traces the step once and the traced ``GraphModule`` is
replayed. Tracing bakes every Python value derived from device data and refuses host reads of traced tensors
(``.item()``, ``bool(tensor)``), exactly like CUDA-graph capture, so 'fx' checks on a CPU what a CUDA graph would
replay. Any object with a ``capture(fn, inputs) -> replay`` method (see ``CUDAGraphCapture``) may be passed too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from fla.models.utils import Cache, _map_tensors

BACKENDS = ("cuda", "fx")
# states of full-attention / NSA layers that a one-token step writes only past each row's valid entries
APPEND_ONLY_STATES = ("attn_state", "nsa_cmp_state")
IDS_DTYPES = (torch.int32, torch.int64)

Leaf = Tuple[int, str, torch.Tensor]  # (layer index, state path such as "attn_state[0]", tensor)


# ----------------------------------------------------------------------------------------------------------------
# the cache's states as a flat list of tensors


def _collect(obj: Any, path: str, layer_idx: int, out: List[Leaf]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((layer_idx, path, obj))
    elif isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            _collect(o, f"{path}[{i}]", layer_idx, out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _collect(v, f"{path}[{k!r}]", layer_idx, out)


def cache_leaves(cache: Cache) -> List[Leaf]:
    """Every tensor the cache holds, in a fixed order (layer, then state name, then position inside the state), as
    (layer index, state path, tensor); the path names the state, e.g. ``attn_state[0]`` or
    ``lte_state['k_cache']``."""
    out: List[Leaf] = []
    for layer_idx, state in enumerate(cache.states):
        for name, value in state.items():
            _collect(value, name, layer_idx, out)
    return out


def _gather_tensors(obj: Any, out: List[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _gather_tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _gather_tensors(o, out)


def _cache_tensors(cache: Cache) -> List[torch.Tensor]:
    """The tensors of ``cache_leaves`` without their names (cheap enough to run every decode step)."""
    out: List[torch.Tensor] = []
    for state in cache.states:
        for value in state.values():
            _gather_tensors(value, out)
    return out


def _substitute(obj: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """A copy of the nested containers of ``obj`` (a list of layer states, or one state) with its tensors replaced,
    in ``cache_leaves`` order, by the next ones of the iterator ``tensors``; other leaves (None, ints) are kept."""
    return _map_tensors(obj, lambda _: next(tensors))


def _check_layout(paths: Sequence[Tuple[int, str]], static: Sequence[torch.Tensor], leaves: Sequence[Leaf],
                  when: str) -> None:
    """Raise ``ValueError`` naming the first state whose name, shape, dtype or device differs from the static
    buffers'. ``when`` says what changed it."""
    new_paths = [(i, p) for i, p, _ in leaves]
    if new_paths != list(paths):
        missing = [f"layer {i} {p!r}" for i, p in paths if (i, p) not in set(new_paths)]
        added = [f"layer {i} {p!r}" for i, p in new_paths if (i, p) not in set(paths)]
        raise ValueError(
            f"the cache's states changed their layout {when}: no longer there: {missing or 'none'}; new: "
            f"{added or 'none'}. A graph replays a fixed set of state tensors; prefill every layer first "
            "(decode one step eagerly) and capture again")
    for (layer_idx, path, new), old in zip(leaves, static):
        if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
            raise ValueError(
                f"layer {layer_idx}: state {path!r} changes from {list(old.shape)} {old.dtype} on {old.device} to "
                f"{list(new.shape)} {new.dtype} on {new.device} {when}. A captured graph replays fixed shapes, so "
                "this cache cannot be decoded with a CUDA graph (full attention and NSA caches keep their shape "
                "only within the capacity GraphDecoder's max_length reserves; Gated DeltaNet, sliding-window "
                "attention and LTE caches always do)")


# ----------------------------------------------------------------------------------------------------------------
# capture backends: capture(fn, inputs) runs fn(*inputs) as often as it needs and returns replay() -> fn's output,
# computed again from the current contents of ``inputs`` (fn updates some of them in place)


@functools.lru_cache(maxsize=None)
def _capture_stream(device_index: int) -> "torch.cuda.Stream":
    """The one side stream of a device on which every capture warms up and records. torch keeps a cuBLAS workspace
    (32 MiB on Hopper) for each stream that runs a matmul and never frees it, so a new stream per capture made the
    allocated memory grow by about that much with every ``GraphDecoder`` of a process."""
    return torch.cuda.Stream(device=device_index)


class CUDAGraphCapture:
    """``torch.cuda.CUDAGraph`` capture: ``warmup_runs`` runs on a side stream first (as the torch docs require:
    kernel compilation, autotuning and allocator warm-up stay out of the graph), then one capture. ``replay()``
    returns the graph's static output tensor, overwritten by the next replay. ``pool``: a memory pool handle
    (``torch.cuda.graph_pool_handle()``) to share between graphs, or None."""

    def __init__(self, warmup_runs: int = 2, pool: Optional[Any] = None) -> None:
        if isinstance(warmup_runs, bool) or not isinstance(warmup_runs, int) or warmup_runs < 1:
            raise ValueError(f"warmup_runs must be an int >= 1, got {warmup_runs!r}")
        self.warmup_runs = warmup_runs
        self.pool = pool

    def capture(self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> Callable[[], torch.Tensor]:
        device = inputs[0].device
        if device.type != "cuda":
            raise ValueError(f"the 'cuda' capture backend needs CUDA tensors, but the cache is on {device}; use "
                             "backend='fx' on other devices")
        stream = _capture_stream(device.index if device.index is not None else torch.cuda.current_device())
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_runs):
                fn(*inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            out = fn(*inputs)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        replay.graph = graph  # kept reachable for inspection (e.g. graph.debug_dump)
        return replay


class FXTraceCapture:
    """CPU emulation of graph capture: ``make_fx`` traces ``fn`` once on the real inputs (running it), and
    ``replay()`` runs the traced ``GraphModule`` on the same input tensors. The trace holds only tensor operations:
    Python values derived from device data are baked in, and host reads of traced tensors (``.item()``,
    ``.tolist()``, ``bool(tensor)``) make tracing fail, as they make CUDA-graph capture fail."""

    def capture(self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> Callable[[], torch.Tensor]:
        from torch.fx.experimental.proxy_tensor import make_fx

        module = make_fx(fn)(*inputs)
        inputs = list(inputs)

        def replay() -> torch.Tensor:
            return module(*inputs)

        replay.graph_module = module
        return replay


def _backend(backend: Union[str, Any, None], device: torch.device):
    if backend is None:
        backend = "cuda" if device.type == "cuda" else "fx"
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not a capture backend; choose one of {BACKENDS}, or pass an "
                             "object with a capture(fn, inputs) method")
        if backend == "cuda" and device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, but the cache is on {device}; use backend='fx' "
                             "(the make_fx emulation) on other devices")
        return CUDAGraphCapture() if backend == "cuda" else FXTraceCapture()
    if not callable(getattr(backend, "capture", None)):
        raise ValueError(f"backend must be None, one of {BACKENDS} or an object with a capture(fn, inputs) method, "
                         f"got {type(backend).__name__}")
    return backend


# ----------------------------------------------------------------------------------------------------------------


def _growing_layers(model: torch.nn.Module) -> Iterator[Tuple[torch.nn.Module, str]]:
    """(module, why) of every layer of ``model`` whose cache grows with the sequence."""
    from fla.layers.attn import Attention
    from fla.layers.nsa import NativeSparseAttention

    for module in model.modules():
        if isinstance(module, NativeSparseAttention):
            yield module, "an NSA layer keeps every key (and its compressed blocks)"
        elif isinstance(module, Attention) and module.window_size is None:
            yield module, "a full-attention layer keeps every key"


def growing_cache_layers(model: torch.nn.Module) -> List[Tuple[int, str, str]]:
    """(layer index, state name, why) of every layer of ``model`` whose cache grows with the sequence (full
    attention, NSA): a graph replays their steps only once their capacity is reserved (``GraphDecoder``'s
    ``max_length``). Empty for models of fixed-size caches."""
    return [(module.layer_idx, "attn_state", why) for module, why in _growing_layers(model)]


def reserve_growing_caches(model: torch.nn.Module, cache: Cache, max_length: int) -> List[Tuple[int, int]]:
    """Give every full-attention and NSA layer of ``model`` room for ``max_length`` tokens per row in ``cache``
    (``Attention.reserve_cache`` / ``NativeSparseAttention.reserve_cache``), so that their one-token decode steps
    up to that length write in place. ``max_length``: int >= 1, the padded prompt length plus the tokens still to
    be generated. Every such layer must hold its prefill. Returns (layer index, capacity now held) per layer."""
    _check_int("max_length", max_length, 1)
    return [(module.layer_idx, module.reserve_cache(cache, max_length)) for module, _ in _growing_layers(model)]


class GraphDecoder:
    """Decode steps of ``model`` on ``cache`` replayed as one captured graph; see the module docstring.

    Args:
        model: one of fla's causal LMs (``FLAForCausalLM`` subclasses) in eval mode. Layers whose caches grow
            (``growing_cache_layers(model)``: full attention, NSA) need ``max_length``.
        cache: the ``fla.models.utils.Cache`` to continue, prefilled (every layer has its state). It is the cache
            that is updated: after each ``step`` it holds the new state (same tensors, updated in place) and its
            seen-token counts are one token further.
        backend: 'cuda' (CUDA graph; default for CUDA caches), 'fx' (``make_fx`` trace, the CPU emulation;
            default elsewhere) or an object with a ``capture(fn, inputs) -> replay`` method.
        max_length: None or an int >= 1: the most tokens a row of the cache may reach (its seen-token count, i.e.
            the padded prompt length plus the tokens decoded since, after the last step). ``capture()`` reserves
            that capacity in every full-attention and NSA layer (``reserve_growing_caches``); ``step`` raises a
            ``ValueError`` rather than go past it. Required for models with such layers; with None they are refused.

    ``capture()`` checks the model and cache, runs one step eagerly to check that no state changes shape, and
    captures a step. Those runs execute the step, so it saves every state first and restores it (and the
    seen-token counts) afterwards: capturing consumes no token. It needs memory for one copy of the cache while it
    runs, less the keys and values of full-attention and NSA layers: their steps only write entries past each row's
    valid ones, which restoring the lengths (``attn_lengths``) makes invalid again. ``step(ids)`` captures first if
    needed.
    """

    def __init__(self, model: torch.nn.Module, cache: Cache, backend: Union[str, Any, None] = None,
                 max_length: Optional[int] = None) -> None:
        from fla.models.modeling_base import FLAForCausalLM

        if not isinstance(model, FLAForCausalLM):
            raise ValueError(f"model must be one of fla's causal LMs (an FLAForCausalLM, e.g. "
                             f"HybridGatedDeltaNetForCausalLM), got {type(model).__name__}")
        if not isinstance(cache, Cache):
            raise ValueError(f"cache must be an fla.models.utils.Cache (the past_key_values of a prefill with "
                             f"use_cache=True), got {type(cache).__name__}")
        _check_int("max_length", max_length, 1, optional=True)
        self.model = model
        self.cache = cache
        self.max_length = max_length
        self._backend_arg = backend
        self._replay: Optional[Callable[[], torch.Tensor]] = None
        self._paths: List[Tuple[int, str]] = []
        self._states: List[torch.Tensor] = []
        self._template: List[dict] = []
        self._deltas: Tuple[int, ...] = ()
        self._ids: Optional[torch.Tensor] = None
        self._inference = False
        self._counts: Tuple[int, ...] = ()

    @property
    def batch_size(self) -> int:
        return self._ids.shape[0] if self._ids is not None else self.cache.batch_size

    @property
    def captured(self) -> bool:
        return self._replay is not None

    # ------------------------------------------------------------------------------------------------------------

    def _grad_mode(self):
        # states made under inference_mode can only be written in place under inference_mode
        return torch.inference_mode() if self._inference else torch.no_grad()

    def _install(self) -> None:
        """Point the cache at the static state buffers."""
        self.cache.states = _substitute(self._template, iter(self._states))

    def _step_fn(self, ids: torch.Tensor, *states: torch.Tensor) -> torch.Tensor:
        """The captured function: one decode step on the cache whose states are ``states``; every new state is
        copied into its static buffer. Returns the logits [B, 1, vocab].

        A backend may run it several times (warm-up runs, then the capture): every run starts from the seen-token
        counts of the capture, so the host-side decisions baked into the graph (e.g. "the reserved cache has room")
        are those of the step replayed first, whatever the number of runs."""
        self.cache.set_seen_tokens(self._counts)
        self.cache.states = _substitute(self._template, iter(states))
        logits = self.model(ids, past_key_values=self.cache, use_cache=True).logits
        leaves = cache_leaves(self.cache)
        _check_layout(self._paths, states, leaves, "in a captured decode step")
        for static, (_, _, new) in zip(states, leaves):
            if new is not static:
                static.copy_(new)
        return logits

    def _dry_run(self) -> Tuple[int, ...]:
        """One eager step on the static states: checks the logits and the state shapes; returns the seen-token
        count each layer advances by."""
        before = self.cache.seen_tokens_per_layer()
        out = self.model(self._ids, past_key_values=self.cache, use_cache=True)
        logits = getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape[:2]) != (self.batch_size, 1):
            raise ValueError(f"a decode step of {type(self.model).__name__} must return logits [B={self.batch_size}, "
                             f"1, vocab], got {None if logits is None else list(logits.shape)}")
        _check_layout(self._paths, self._states, cache_leaves(self.cache), "in one decode step")
        after = self.cache.seen_tokens_per_layer()
        return tuple(a - b for a, b in zip(after, before))

    def _restore(self, saved: Sequence[Optional[torch.Tensor]], counts: Tuple[int, ...]) -> None:
        self._install()
        for static, value in zip(self._states, saved):
            if value is not None:
                static.copy_(value)
        self.cache.set_seen_tokens(counts)

    def capture(self) -> "GraphDecoder":
        """Check the model and the cache and capture one decode step; returns ``self``. The cache's states and
        counts are as before (left-padding of still-filling sliding-window caches apart, which changes no output)."""
        from fla.layers.attn import Attention

        if self.model.training:
            raise ValueError("the model is in training mode (dropout, chunked training kernels); call model.eval() "
                             "before capturing decode steps")
        growing = growing_cache_layers(self.model)
        if growing and self.max_length is None:
            layer_idx, name, why = growing[0]
            others = f" (and {len(growing) - 1} more such layers)" if len(growing) > 1 else ""
            raise ValueError(
                f"layer {layer_idx}: state {name!r} grows with the sequence ({why}){others}, so its shape changes "
                f"between decode steps and {type(self.model).__name__} cannot be decoded with a CUDA graph as it is; "
                "pass max_length (the padded prompt length plus the tokens to generate) to reserve that capacity "
                "in such layers, whose steps then write in place (models of fixed-size caches only, Gated DeltaNet, "
                "sliding-window attention, LTE, need none)")
        if len(self.cache) == 0:
            raise ValueError("cache holds no state: prefill it first (model(prompt, use_cache=True).past_key_values)")
        if self.max_length is not None:
            self._check_room(1, "capture (which needs room for one step)")
            reserve_growing_caches(self.model, self.cache, self.max_length)
        for module in self.model.modules():
            if isinstance(module, Attention):
                module.pad_cache_to_window(self.cache)

        leaves = cache_leaves(self.cache)
        if not leaves:
            raise ValueError("cache holds no tensor: prefill it first (model(prompt, use_cache=True))")
        devices = {t.device for _, _, t in leaves}
        if len(devices) > 1:
            raise ValueError(f"the cache's states lie on several devices {sorted(map(str, devices))}; a graph needs "
                             "them on one")
        device = leaves[0][2].device
        model_device = next(self.model.parameters()).device
        if model_device != device:
            raise ValueError(f"the model is on {model_device} but the cache on {device}")
        backend = _backend(self._backend_arg, device)
        self._paths = [(i, p) for i, p, _ in leaves]
        self._states = [t for _, _, t in leaves]
        self._template = _substitute(self.cache.states, iter(self._states))
        self._inference = any(t.is_inference() for t in self._states)
        batch_size = self.cache.batch_size
        with self._grad_mode():
            self._ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            # keys and values of growing layers are only written past each row's valid entries: restoring the
            # lengths undoes a step there (see the class docstring), so those big tensors need no copy
            skip = {i for i, _, _ in growing}
            saved = [None if i in skip and p.split("[")[0] in APPEND_ONLY_STATES else t.clone()
                     for (i, p), t in zip(self._paths, self._states)]
            counts = self.cache.seen_tokens_per_layer()
            self._counts = counts
            try:
                self._deltas = self._dry_run()
                self._restore(saved, counts)
                try:
                    replay = backend.capture(self._step_fn, [self._ids, *self._states])
                except ValueError:
                    raise
                except Exception as e:  # noqa: BLE001 - say what usually causes it, keep the original
                    raise RuntimeError(
                        f"the decode step of {type(self.model).__name__} could not be captured by "
                        f"{type(backend).__name__}: {type(e).__name__}: {e}. A captured step must not read device "
                        "values on the host (.item(), .tolist(), bool(tensor), int(tensor), data-dependent shapes)"
                    ) from e
            finally:
                self._restore(saved, counts)
            del saved
        self._replay = replay
        return self

    # ------------------------------------------------------------------------------------------------------------

    def _check_room(self, steps: int, what: str) -> None:
        """Raise ``ValueError`` if ``steps`` more tokens would take a layer's seen-token count past ``max_length``
        (host-side counts only, never a device read)."""
        for layer_idx, count in enumerate(self.cache.seen_tokens_per_layer()):
            if count + steps > self.max_length:
                raise ValueError(
                    f"{what} would take the cache to {count + steps} tokens (layer {layer_idx} has seen {count}), past "
                    f"max_length={self.max_length}, the capacity the decoder reserved; create a GraphDecoder with a "
                    "larger max_length (the padded prompt length plus every token to generate)")

    def _adopt_cache_states(self) -> None:
        """Make the static buffers hold the cache's current states: after eager calls on the same cache, copy the
        states they replaced into the buffers and point the cache at the buffers again."""
        current = _cache_tensors(self.cache)
        if len(current) == len(self._states) and all(t is s for t, s in zip(current, self._states)):
            return
        leaves = cache_leaves(self.cache)
        _check_layout(self._paths, self._states, leaves, "since the capture (eager calls, reorder_cache, reset?)")
        for static, (_, _, t) in zip(self._states, leaves):
            if t is not static:
                static.copy_(t)
        self._install()

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One decode step: ``ids`` [B, 1] (int32 / int64, on the cache's device; B = the cache's batch size) are
        the new tokens, all real. Returns the logits [B, 1, vocab] (a new tensor) and leaves the cache one token
        further, as ``model(ids, past_key_values=cache, use_cache=True)`` would."""
        if self._replay is None:
            self.capture()
        if not isinstance(ids, torch.Tensor) or ids.dtype not in IDS_DTYPES:
            what = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be an int32 / int64 tensor [B, 1], got {what}")
        if tuple(ids.shape) != tuple(self._ids.shape):
            raise ValueError(f"ids must have shape {list(self._ids.shape)} (the cache's batch size, one token each), "
                             f"got {list(ids.shape)}")
        if ids.device != self._ids.device:
            raise ValueError(f"ids is on {ids.device} but the cache on {self._ids.device}")
        if self.max_length is not None:
            self._check_room(1, "this step")
        with self._grad_mode():
            self._adopt_cache_states()
            self._ids.copy_(ids)
            logits = self._replay().clone()
        counts = self.cache.seen_tokens_per_layer()
        self.cache.set_seen_tokens(tuple(c + d for c, d in zip(counts, self._deltas)))
        return logits


# ----------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, vocab] -> next ids [B]: argmax, or a sample of softmax(logits / temperature) restricted to the
    ``top_k`` largest logits (0: all)."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


def graph_generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                   eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                   generator: Optional[torch.Generator] = None,
                   backend: Union[str, Any, None] = None) -> torch.LongTensor:
    """Greedy or sampled generation whose decode steps replay one captured graph (``GraphDecoder``).

    The prompt is prefilled eagerly (left padding through ``attention_mask`` is fine), full-attention and NSA
    caches get room for ``max_length`` = prompt length + ``max_new_tokens`` tokens (``reserve_growing_caches``), the
    first decode step runs eagerly too (every layer's state then has its decode-time shape), and every later step
    is a replay. Token
    choice runs outside the graph: argmax, or with ``do_sample`` a sample of softmax(logits / ``temperature``)
    over the ``top_k`` largest logits (0: all), drawn with ``generator``. As ``generate()`` does, a row that has
    produced ``eos_token_id`` continues with ``pad_token_id`` (default: the eos id), and generation stops once every
    row has (one host read per step, only when ``eos_token_id`` is set).

    Args:
        model: an eval-mode fla causal LM (see ``GraphDecoder``).
        input_ids: [B, T] int prompt; attention_mask: [B, T] 0/1 (left padding) or None.
        max_new_tokens: >= 1. backend: as ``GraphDecoder``'s ('cuda' on CUDA, the 'fx' emulation elsewhere).

    Returns:
        [B, T + n] int64: the prompt followed by n <= ``max_new_tokens`` new tokens. With greedy decoding the new
        tokens are those of ``model.generate(input_ids, attention_mask=..., do_sample=False, ...)``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype not in IDS_DTYPES:
        what = f"{input_ids.dtype} {list(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else \
            type(input_ids).__name__
        raise ValueError(f"input_ids must be an int32 / int64 tensor [batch, time], got {what}")
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("top_k", top_k, 0)
    _check_int("eos_token_id", eos_token_id, 0, optional=True)
    _check_int("pad_token_id", pad_token_id, 0, optional=True)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    pad = eos_token_id if pad_token_id is None else pad_token_id

    def choose(logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        nxt = _next_tokens(logits[:, -1], do_sample, temperature, top_k, generator)
        return nxt if pad is None else torch.where(done, torch.full_like(nxt, pad), nxt)

    max_length = input_ids.shape[1] + max_new_tokens
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        if max_new_tokens > 1 and growing_cache_layers(model):  # the first (eager) step writes in place already
            reserve_growing_caches(model, cache, max_length)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new = [choose(out.logits, done)]
        decoder = None
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None:
                done = done | (new[-1] == eos_token_id)
                if bool(done.all()):
                    break
            ids = new[-1][:, None]
            if decoder is None:
                logits = model(ids, past_key_values=cache, use_cache=True).logits
                decoder = GraphDecoder(model, cache, backend=backend, max_length=max_length).capture()
            else:
                logits = decoder.step(ids)
            new.append(choose(logits, done))
    return torch.cat([input_ids.long(), torch.stack(new, 1).long()], 1)
