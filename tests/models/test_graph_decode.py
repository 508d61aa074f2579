"""GraphDecoder (``fla.models.graph_decode``): decode steps replayed from one capture equal eager decoding.

On the CPU the capture is emulated with ``make_fx`` ('fx' backend): the step is traced once and the traced graph
replayed, so any Python value derived from device data is baked in as a CUDA graph would bake it, and host reads of
device values fail the capture. The ``gpu`` test runs the real CUDA-graph backend in bf16.

Every case: a batch of 3 rows with random left padding is prefilled, stepped once eagerly, copied (the reference),
captured, then 20 graph steps, 3 eager steps and 3 graph steps on the captured cache are compared, logits and
seen-token counts, with eager steps of the same tokens on the copy. Models whose caches grow (full attention, NSA)
are captured with ``max_length``: their caches get that capacity, keep their tensors through every step, and a step
past ``max_length`` raises.
"""

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fla.layers import Attention, GatedDeltaNet, LTEAttention, NativeSparseAttention
from fla.models.graph_decode import (
    FXTraceCapture,
    GraphDecoder,
    cache_leaves,
    graph_generate,
    growing_cache_layers,
)
from fla.models.utils import Cache
from fla.utils.testing import assert_close
from tests.models.helpers import left_padded_batch
from tests.models.test_gated_deltanet import tiny_config as tiny_gdn_config
from tests.models.test_hybrid_gated_deltanet import tiny_config as tiny_hybrid_config
from tests.models.test_transformer import tiny_model as tiny_transformer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V = 64
WINDOW = 32  # the window of both tiny JSON configs (SWA: 32 keys; LTE: the token + 32 previous ones)


def build(kind: str, device, dtype=torch.float32, **attn):
    """A tiny eval-mode model: 'gdn' (Gated DeltaNet only), 'gdn_swa' (configs/tiny_gdn_swa.json), 'gdn_attn' (the
    same with full attention), 'lalte' (configs/tiny_gdn_lte.json), 'transformer' (2 full-attention layers),
    'lansa' (GDN + NSA on layers 1 and 3, block size 4); ``attn`` overrides keys of the attn dict."""
    torch.manual_seed(0)
    if kind == "transformer":
        return tiny_transformer(device).to(dtype=dtype).eval()
    if kind == "gdn":
        config = tiny_gdn_config()
    elif kind == "lansa":
        config = tiny_hybrid_config(attn_type="nsa")
    else:
        config = AutoConfig.from_pretrained(CONFIGS / ("tiny_gdn_lte.json" if kind == "lalte" else "tiny_gdn_swa.json"))
        config.vocab_size, config.pad_token_id = V, 0
        config.attn = {**config.attn, **({"window_size": None} if kind == "gdn_attn" else {}), **attn}
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    for module in model.modules():  # about half of the router scores positive: eviction decides something
        if isinstance(module, LTEAttention):
            with torch.no_grad():
                module.router.conv_stack.proj.bias.zero_()
    return model


def prefill(model, T: int, device, batch: int = 3):
    """Prefill a batch with random left padding (one full row, the others 1..T real tokens) and decode one eager
    step; returns the cache."""
    lens = [T] + [int(torch.randint(1, T + 1, ())) for _ in range(batch - 1)]
    ids, mask = left_padded_batch(lens, T, device, V)
    cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    model(torch.randint(3, V, (batch, 1), device=device), past_key_values=cache, use_cache=True)
    return cache


def growing_tensors(model, cache):
    """The cached keys / values (and NSA's compressed blocks) of every full-attention and NSA layer."""
    return [t for layer, _, _ in growing_cache_layers(model)
            for name in ("attn_state", "nsa_cmp_state") for t in (cache[layer].get(name) or ())]


def check_graph_decoding(model, T: int, device, backend, tol: float, graph_steps: int = 20,
                         eager_steps: int = 3, graph_steps_after: int = 3, extra_room: int = 0) -> GraphDecoder:
    """``extra_room``: for models whose caches grow, capture with max_length = every token of the schedule and
    of the 3-token continuation, plus ``extra_room`` graph steps after it; then one more step must raise."""
    schedule = ["graph"] * graph_steps + ["eager"] * eager_steps + ["graph"] * graph_steps_after
    growing = bool(growing_cache_layers(model))
    max_length = T + 1 + len(schedule) + 3 + extra_room if growing else None
    with torch.no_grad():
        cache = prefill(model, T, device)
        reference = copy.deepcopy(cache)
        decoder = GraphDecoder(model, cache, backend=backend, max_length=max_length).capture()
        ptrs = [t.data_ptr() for t in growing_tensors(model, cache)]
        # capturing consumed no token: the counts are as before and the next step continues from the same state
        assert cache.seen_tokens_per_layer() == reference.seen_tokens_per_layer()
        for t, how in enumerate(schedule):
            ids = torch.randint(3, V, (cache.batch_size, 1), device=device)
            if how == "graph":
                logits = decoder.step(ids)
            else:
                logits = model(ids, past_key_values=cache, use_cache=True).logits
            expected = model(ids, past_key_values=reference, use_cache=True).logits
            assert_close(f"step {t} ({how})", logits, expected, tol)
            assert cache.seen_tokens_per_layer() == reference.seen_tokens_per_layer(), f"step {t} ({how})"
        assert cache.get_seq_length() == T + 1 + len(schedule)
        # a several-token continuation (the chunked path of every layer) still matches, also on a padded window
        ids = torch.randint(3, V, (cache.batch_size, 3), device=device)
        assert_close("3-token continuation", model(ids, past_key_values=cache, use_cache=True).logits,
                     model(ids, past_key_values=reference, use_cache=True).logits, tol)
        if growing:  # graph steps go on after it, up to max_length, on the same reserved tensors
            for t in range(extra_room):
                ids = torch.randint(3, V, (cache.batch_size, 1), device=device)
                assert_close(f"step {t} after the continuation", decoder.step(ids),
                             model(ids, past_key_values=reference, use_cache=True).logits, tol)
            assert [t.data_ptr() for t in growing_tensors(model, cache)] == ptrs
            assert cache.get_seq_length() == max_length
            with pytest.raises(ValueError, match=rf"would take the cache to {max_length + 1} tokens .*past "
                                                 rf"max_length={max_length}"):
                decoder.step(ids)
    return decoder


CASES = [("gdn", 40), ("gdn_swa", 40), ("gdn_swa", 10), ("lalte", 40), ("lalte", 10)]


@pytest.mark.parametrize("kind, T", CASES, ids=[f"{k}-T{t}" for k, t in CASES])
def test_graph_steps_equal_eager_steps(kind, T):
    """T = 40: the SWA window (32) and the LTE ring (33) are full and LTE evicts into its buffer; T = 10: both still
    fill up during the steps (the SWA cache is left-padded to the window at capture)."""
    model = build(kind, "cpu")
    decoder = check_graph_decoding(model, T, "cpu", backend="fx", tol=1e-5)
    for module in model.modules():
        if isinstance(module, Attention):  # the window cache kept one shape: the window
            assert decoder.cache[module.layer_idx]["attn_state"][0].shape[1] == WINDOW


GROWING_CASES = [("transformer", 12), ("lansa", 12), ("lansa", 5)]


@pytest.mark.parametrize("kind, T", GROWING_CASES, ids=[f"{k}-T{t}" for k, t in GROWING_CASES])
def test_graph_steps_with_reserved_caches_equal_eager_steps(kind, T):
    """Full attention and NSA, captured with max_length: the caches get the capacity (NSA: rounded up to its block
    size), graph, eager and chunked steps on them equal eager steps on an unreserved copy and keep the tensors,
    and the step past max_length raises. T = 5: NSA's first blocks complete during the graph steps."""
    model = build(kind, "cpu")
    decoder = check_graph_decoding(model, T, "cpu", backend="fx", tol=1e-5, extra_room=2)
    for module in model.modules():
        if isinstance(module, (Attention, NativeSparseAttention)):
            capacity = decoder.cache[module.layer_idx]["attn_state"][0].shape[1]
            assert capacity == (decoder.max_length if isinstance(module, Attention) else
                                -(-decoder.max_length // module.block_size) * module.block_size)


class WarmedUpFX(FXTraceCapture):
    """Runs the step twice eagerly before tracing it, as the CUDA-graph backend's warm-up runs do."""

    def capture(self, fn, inputs):
        for _ in range(2):
            fn(*inputs)
        return super().capture(fn, inputs)


@pytest.mark.parametrize("kind", ["transformer", "lansa"])
def test_capture_runs_need_no_room_beyond_max_length(kind):
    """Capture runs of the step (warm-ups) may go past max_length; they write nowhere they should not and are
    undone: with room for exactly one step, that step equals the eager one, and the next one raises."""
    model = build(kind, "cpu")
    with torch.no_grad():
        cache = prefill(model, 7, "cpu")
        reference = copy.deepcopy(cache)
        decoder = GraphDecoder(model, cache, backend=WarmedUpFX(), max_length=cache.get_seq_length() + 1).capture()
        assert cache.seen_tokens_per_layer() == reference.seen_tokens_per_layer()
        ids = torch.randint(3, V, (3, 1))
        assert_close("the one step", decoder.step(ids), model(ids, past_key_values=reference, use_cache=True).logits,
                     1e-5)
        with pytest.raises(ValueError, match="past max_length=9"):
            decoder.step(ids)
        with pytest.raises(ValueError, match=r"capture \(which needs room for one step\) would take the cache to 10"):
            GraphDecoder(model, cache, backend="fx", max_length=9).capture()
        with pytest.raises(ValueError, match="max_length must be an int >= 1 or None"):
            GraphDecoder(model, cache, max_length=0)


def test_growing_caches_are_refused():
    transformer = tiny_transformer("cpu").eval()
    assert [layer for layer, _, _ in growing_cache_layers(transformer)] == [0, 1]
    with torch.no_grad():
        cache = prefill(transformer, 8, "cpu")
        counts = cache.seen_tokens_per_layer()
        with pytest.raises(ValueError, match=r"layer 0: state 'attn_state' grows with the sequence \(a full-attention"
                                             r".*cannot be decoded with a CUDA graph"):
            GraphDecoder(transformer, cache).capture()
        with pytest.raises(ValueError, match="pass max_length"):
            GraphDecoder(transformer, cache, backend="fx").step(torch.zeros(3, 1, dtype=torch.long))
        assert cache.seen_tokens_per_layer() == counts
        hybrid = build("gdn_attn", "cpu")
        with pytest.raises(ValueError, match="layer 1: state 'attn_state'"):
            GraphDecoder(hybrid, prefill(hybrid, 8, "cpu")).step(torch.zeros(3, 1, dtype=torch.long))
    lansa = AutoModelForCausalLM.from_config(tiny_hybrid_config(attn_type="nsa"))
    assert [layer for layer, _, _ in growing_cache_layers(lansa)] == [1, 3]
    assert growing_cache_layers(build("gdn_swa", "cpu")) == [] and growing_cache_layers(build("lalte", "cpu")) == []


def test_a_state_that_changes_shape_is_refused_by_the_dry_run(monkeypatch):
    """Without the left padding, a window cache still filling grows in the dry-run step: refused, naming the layer
    and the state, and the cache is left as it was."""
    monkeypatch.setattr(Attention, "pad_cache_to_window", lambda self, cache: None)
    model = build("gdn_swa", "cpu")
    with torch.no_grad():
        cache = prefill(model, 10, "cpu")
        before = [(i, p, t.clone()) for i, p, t in cache_leaves(cache)]
        counts = cache.seen_tokens_per_layer()
        with pytest.raises(ValueError, match=r"layer 1: state 'attn_state\[0\]' changes from \[3, 11, 2, 32\] "
                                             r"torch.float32 on cpu to \[3, 12, 2, 32\]"):
            GraphDecoder(model, cache, backend="fx").capture()
    after = cache_leaves(cache)
    assert [(i, p) for i, p, _ in after] == [(i, p) for i, p, _ in before]
    for (_, path, old), (_, _, new) in zip(before, after):
        assert torch.equal(old, new), path
    assert cache.seen_tokens_per_layer() == counts


def test_a_host_sync_in_the_step_fails_the_capture(monkeypatch):
    """A layer that reads a device value on the host runs eagerly, but its capture fails (as a CUDA graph's
    would), with a message saying why; the cache is restored."""
    forward = GatedDeltaNet.forward

    def forward_with_sync(self, hidden_states, *args, **kwargs):
        if float(hidden_states.abs().sum()) < 0:  # a host read of a device value; never true
            raise AssertionError
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(GatedDeltaNet, "forward", forward_with_sync)
    model = build("gdn", "cpu")
    with torch.no_grad():
        cache = prefill(model, 6, "cpu")
        reference = copy.deepcopy(cache)
        with pytest.raises(RuntimeError, match=r"could not be captured .*must not read device values on the host"):
            GraphDecoder(model, cache, backend="fx").capture()
        ids = torch.randint(3, V, (3, 1))
        assert_close("after a failed capture", model(ids, past_key_values=cache, use_cache=True).logits,
                     model(ids, past_key_values=reference, use_cache=True).logits, 1e-6)


def test_argument_errors():
    model = build("gdn", "cpu")
    with torch.no_grad():
        cache = prefill(model, 6, "cpu")
        with pytest.raises(ValueError, match="model must be one of fla's causal LMs"):
            GraphDecoder(model.model, cache)
        with pytest.raises(ValueError, match="cache must be an fla.models.utils.Cache"):
            GraphDecoder(model, cache.to_legacy_cache())
        with pytest.raises(ValueError, match="cache holds no state"):
            GraphDecoder(model, Cache()).capture()
        with pytest.raises(ValueError, match="backend='nope' is not a capture backend"):
            GraphDecoder(model, cache, backend="nope").capture()
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
            GraphDecoder(model, cache, backend="cuda").capture()
        model.train()
        with pytest.raises(ValueError, match=r"training mode.*model.eval\(\)"):
            GraphDecoder(model, cache).capture()
        model.eval()
        decoder = GraphDecoder(model, cache).capture()
        with pytest.raises(ValueError, match=r"ids must have shape \[3, 1\]"):
            decoder.step(torch.zeros(2, 1, dtype=torch.long))
        with pytest.raises(ValueError, match="ids must be an int32 / int64 tensor"):
            decoder.step(torch.zeros(3, 1))
        cache.batch_repeat_interleave(2)  # the cache no longer has the captured shapes
        with pytest.raises(ValueError, match="since the capture"):
            decoder.step(torch.zeros(3, 1, dtype=torch.long))


GEN_CASES = [("gdn_swa", 40), ("lalte", 40), ("lalte", 10), ("transformer", 12), ("lansa", 12)]


@pytest.mark.parametrize("kind, T", GEN_CASES, ids=[f"{k}-T{t}" for k, t in GEN_CASES])
def test_graph_generate_equals_generate(kind, T):
    """Greedy graph_generate gives generate()'s tokens with left padding, also when a row stops at its EOS early
    (the EOS id is one that row produces at its fourth step) and the others go on."""
    model = build(kind, "cpu")
    ids, mask = left_padded_batch([T, 3, T - 5], T, "cpu", V)
    steps = 12
    with torch.no_grad():
        first = graph_generate(model, ids, mask, max_new_tokens=steps, backend="fx")
        eos = int(first[1, T + 3])
        ours = graph_generate(model, ids, mask, max_new_tokens=steps, eos_token_id=eos, pad_token_id=0,
                              backend="fx")
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)
    assert first.shape == (3, T + steps)
    assert torch.equal(first[:, :T], ids)
    assert torch.equal(ours, ref), (ours[:, T:], ref[:, T:])
    assert (ours[1, T:] == eos).any() and (ours[1, T + 4:] == 0).all()


def test_graph_generate_sampling_and_errors():
    model = build("gdn_swa", "cpu")
    ids, mask = left_padded_batch([20, 7], 20, "cpu", V)
    with torch.no_grad():
        greedy = graph_generate(model, ids, mask, max_new_tokens=6, backend="fx")
        top1 = graph_generate(model, ids, mask, max_new_tokens=6, do_sample=True, top_k=1, backend="fx")
        runs = [graph_generate(model, ids, mask, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=10,
                               generator=torch.Generator().manual_seed(3), backend="fx") for _ in range(2)]
    assert torch.equal(top1, greedy)
    assert torch.equal(runs[0], runs[1])
    assert runs[0].min() >= 0 and runs[0].max() < V
    for kwargs, match in [({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
                          ({"temperature": 0.0}, "temperature must be a number > 0"),
                          ({"top_k": -1}, "top_k must be an int >= 0"),
                          ({"eos_token_id": 1.5}, "eos_token_id must be an int >= 0 or None")]:
        with pytest.raises(ValueError, match=match):
            graph_generate(model, ids, mask, backend="fx", **kwargs)
    with pytest.raises(ValueError, match="input_ids must be an int32 / int64 tensor"):
        graph_generate(model, ids.float(), mask, backend="fx")


@pytest.mark.gpu
@pytest.mark.parametrize("kind, T", CASES + GROWING_CASES, ids=[f"{k}-T{t}" for k, t in CASES + GROWING_CASES])
def test_cuda_graph_steps_equal_eager_steps(kind, T, backend):
    """The real CUDA-graph backend in bf16, with the torch and the Triton paths (``FLA_BACKEND``); full attention
    and NSA with max_length (reserved caches)."""
    model = build(kind, "cuda", dtype=torch.bfloat16)
    check_graph_decoding(model, T, "cuda", backend="cuda", tol=2e-2, extra_room=2)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["transformer", "lansa"])
def test_cuda_graph_generate_equals_generate(kind, backend):
    """graph_generate with CUDA graphs gives generate()'s greedy tokens (float32: no near-tie flips between the
    reserved, in-place cache and generate()'s concatenated one)."""
    model = build(kind, "cuda")
    ids, mask = left_padded_batch([12, 3, 7], 12, "cuda", V)
    with torch.no_grad():
        ours = graph_generate(model, ids, mask, max_new_tokens=10, backend="cuda")
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert torch.equal(ours, ref), (ours[:, 12:], ref[:, 12:])
