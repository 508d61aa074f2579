"""Attention layer: the reference computation, padding == packing == per-sequence runs, cached decoding and chunked
prefill == one pass (full and sliding window, GQA, random left padding), a bounded SWA cache, dispatch, errors."""

import pytest
import torch

import fla.ops.attn as attn_ops
from fla.layers import Attention
from fla.models.utils import Cache
from fla.ops.attn import naive_attn
from fla.utils.testing import assert_close

H = 32


def make_layer(device, **kwargs):
    options = dict(hidden_size=H, num_heads=4, num_kv_heads=2, layer_idx=0)
    options.update(kwargs)
    return Attention(**options).to(device)


def padding_mask(lens, T, left, device):
    mask = torch.zeros(len(lens), T, dtype=torch.long, device=device)
    for b, n in enumerate(lens):
        if left:
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    return mask


def reference(layer, x):
    """o_proj(attention(RoPE(q), RoPE(k), v)) for one unpadded batch x [B, T, H], positions 0..T-1."""
    q = layer.q_proj(x).unflatten(-1, (layer.num_heads, layer.head_dim))
    k = layer.k_proj(x).unflatten(-1, (layer.num_kv_heads, layer.head_dim))
    v = layer.v_proj(x).unflatten(-1, (layer.num_kv_heads, layer.head_dim))
    if layer.qk_norm:
        q, k = layer.q_norm(q), layer.k_norm(k)
    d = layer.head_dim // 2
    inv_freq = 1.0 / (layer.rope_theta ** (torch.arange(0, d, device=x.device).float() / d))
    angle = torch.arange(x.shape[1], device=x.device).float()[:, None] * inv_freq  # [T, d]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]

    def rope(t):
        t1, t2 = t[..., :d], t[..., d:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

    o = naive_attn(rope(q), rope(k), v, window_size=layer.window_size)
    return layer.o_proj(o.flatten(-2))


@pytest.mark.parametrize("window_size", [None, 3])
@pytest.mark.parametrize("options", [dict(), dict(num_kv_heads=4, qkv_bias=True, qk_norm=True)],
                         ids=["gqa", "mha-bias-qknorm"])
def test_matches_reference(device, window_size, options):
    layer = make_layer(device, window_size=window_size, **options)
    x = torch.randn(2, 11, H, device=device)
    o, attentions, cache = layer(x)
    assert attentions is None and cache is None and o.shape == x.shape
    assert_close("o", o, reference(layer, x), 1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
@pytest.mark.parametrize("window_size", [None, 4])
def test_padded_equals_packed_equals_per_sequence(device, training, left, window_size):
    layer = make_layer(device, window_size=window_size).train(training)
    lens, T = [7, 12, 3], 12
    x = torch.randn(3, T, H, device=device)
    mask = padding_mask(lens, T, left, device)
    x = x * mask[..., None]
    padded, _, _ = layer(x, attention_mask=mask)
    assert torch.all(padded[mask == 0] == 0)
    packed_x = x[mask.bool()][None]
    cu = torch.tensor([0, 7, 19, 22], device=device, dtype=torch.int32)
    packed, _, _ = layer(packed_x, cu_seqlens=cu)
    assert_close("padded vs packed", padded[mask.bool()][None], packed, 1e-5)
    for b in range(3):
        alone, _, _ = layer(x[b:b + 1, mask[b].bool()])
        assert_close(f"row {b}", padded[b:b + 1, mask[b].bool()], alone, 1e-5)
    if training:
        padded.sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def left_padded(lens, T, device):
    mask = padding_mask(lens, T, True, device)
    return torch.randn(len(lens), T, H, device=device) * mask[..., None], mask


@pytest.mark.parametrize("window_size", [None, 3, 5])
def test_cached_decoding_with_left_padding_matches_full_forward(device, window_size):
    layer = make_layer(device, window_size=window_size).eval()
    T, prefill = 12, 4
    # one full row, one row whose prefill chunk is all padding, one random
    lens = [T, int(torch.randint(1, T - prefill + 1, ())), int(torch.randint(1, T + 1, ()))]
    x, mask = left_padded(lens, T, device)
    full, _, _ = layer(x, attention_mask=mask)
    cache = Cache()
    outs = [layer(x[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache, use_cache=True)[0]]
    for t in range(prefill, T):
        o, _, returned = layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
        assert returned is cache
        outs.append(o)
        k, v = cache[0]["attn_state"]
        if window_size is not None:  # the sliding-window cache stays bounded by the window
            assert k.shape[1] <= window_size and v.shape[1] <= window_size
        else:
            assert k.shape[1] == t + 1
    out = torch.cat(outs, 1)
    assert cache.get_seq_length(0) == T
    assert cache[0]["attn_lengths"].tolist() == lens
    for b, n in enumerate(lens):
        assert_close(f"row {b}", out[b, T - n:], full[b, T - n:], 1e-5)
        alone, _, _ = layer(x[b:b + 1, T - n:])
        assert_close(f"row {b} alone", out[b:b + 1, T - n:], alone, 1e-5)


@pytest.mark.parametrize("window_size", [None, 8])
def test_cache_padded_to_the_window_gives_the_same_outputs(device, window_size):
    """``pad_cache_to_window`` (for CUDA-graph decoding): a window cache still filling gets its fixed shape at once,
    and one-token steps and a chunked continuation give what the unpadded cache gives; full attention: unchanged."""
    layer = make_layer(device, window_size=window_size).eval()
    lens, T = [5, 3, 1], 5
    x, mask = left_padded(lens, T, device)
    cache, padded = Cache(), Cache()
    layer(x, attention_mask=mask, past_key_values=cache, use_cache=True)
    layer(x, attention_mask=mask, past_key_values=padded, use_cache=True)
    layer.pad_cache_to_window(padded)
    S = padded[0]["attn_state"][0].shape[1]
    assert S == (T if window_size is None else window_size) and padded.get_seq_length(0) == T
    for t in range(6):
        step = torch.randn(3, 1, H, device=device)
        assert_close(f"step {t}", layer(step, past_key_values=padded, use_cache=True)[0],
                     layer(step, past_key_values=cache, use_cache=True)[0], 1e-5)
        if window_size is not None:
            assert padded[0]["attn_state"][0].shape[1] == window_size
    chunk = torch.randn(3, 3, H, device=device)
    assert_close("chunk", layer(chunk, past_key_values=padded, use_cache=True)[0],
                 layer(chunk, past_key_values=cache, use_cache=True)[0], 1e-5)


@pytest.mark.parametrize("window_size", [None, 3])
def test_chunked_prefill_matches_full_forward(device, window_size):
    """Several new tokens on a non-empty cache (plain forwards continuing a cache): the masked reference path."""
    layer = make_layer(device, window_size=window_size).eval()
    lens, T = [10, 6, 2], 10
    x, mask = left_padded(lens, T, device)
    full, _, _ = layer(x, attention_mask=mask)
    cache = Cache()
    outs = []
    for start, end in ((0, 3), (3, 4), (4, 8), (8, 10)):
        outs.append(layer(x[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True)[0])
        if window_size is not None:
            assert cache[0]["attn_state"][0].shape[1] <= window_size
    out = torch.cat(outs, 1)
    for b, n in enumerate(lens):
        assert_close(f"row {b}", out[b, T - n:], full[b, T - n:], 1e-5)
    # without padding, and without storing: the cache is read but left as it was
    y = torch.randn(2, 9, H, device=device)
    ref, _, _ = layer(y)
    cache = Cache()
    first, _, _ = layer(y[:, :5], past_key_values=cache, use_cache=True)
    second, _, _ = layer(y[:, 5:], past_key_values=cache, use_cache=False)
    assert cache.get_seq_length(0) == 5
    assert cache[0]["attn_state"][0].shape[1] == (5 if window_size is None else window_size)
    assert_close("continued", torch.cat([first, second], 1), ref, 1e-5)
    step, _, _ = layer(y[:, 5:6], past_key_values=cache, use_cache=False)
    assert_close("one step, not stored", step, ref[:, 5:6], 1e-5)


def test_packed_prefill_then_decoding(device):
    """cu_seqlens with a cache: the cache holds one left-aligned row per packed sequence."""
    layer = make_layer(device, window_size=4).eval()
    lens = [5, 2, 7]
    seqs = [torch.randn(1, n + 3, H, device=device) for n in lens]
    cache = Cache()
    packed = torch.cat([s[:, :n] for s, n in zip(seqs, lens)], 1)
    cu = torch.tensor([0, 5, 7, 14], device=device)
    layer(packed, past_key_values=cache, use_cache=True, cu_seqlens=cu)
    assert cache[0]["attn_state"][0].shape[:2] == (3, 4)
    outs = [layer(torch.cat([s[:, n + i:n + i + 1] for s, n in zip(seqs, lens)], 0), past_key_values=cache,
                  use_cache=True)[0] for i in range(3)]
    out = torch.cat(outs, 1)
    for b, (s, n) in enumerate(zip(seqs, lens)):
        assert_close(f"seq {b}", out[b:b + 1], layer(s)[0][:, n:], 1e-5)


def test_dispatch_to_the_ops(device, monkeypatch):
    calls = []
    for name in ("parallel_attn", "attn_decoding_one_step"):
        original = getattr(attn_ops, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, kwargs.get("window_size"), kwargs.get("cu_seqlens") is not None))
            return _original(*args, **kwargs)

        monkeypatch.setattr(attn_ops, name, spy)
    layer = make_layer(device, window_size=6).eval()
    x, mask = left_padded([4, 2], 4, device)
    cache = Cache()
    layer(x, attention_mask=mask, past_key_values=cache, use_cache=True)
    layer(x[:, :1], attention_mask=torch.ones(2, 5, device=device), past_key_values=cache, use_cache=True)
    assert calls == [("parallel_attn", 6, True), ("attn_decoding_one_step", 6, False)]


def test_dtypes_and_state_dict(device):
    layer = make_layer(device).to(torch.bfloat16)
    x = torch.randn(2, 5, H, device=device, dtype=torch.bfloat16)
    assert layer(x)[0].dtype == torch.bfloat16
    keys = {k: tuple(v.shape) for k, v in make_layer(device).state_dict().items()}
    assert keys == {"q_proj.weight": (32, 32), "k_proj.weight": (16, 32), "v_proj.weight": (16, 32),
                    "o_proj.weight": (32, 32)}  # rotary.inv_freq is not persistent
    keys = set(make_layer(device, qkv_bias=True, qk_norm=True).state_dict())
    assert {"q_proj.bias", "k_proj.bias", "v_proj.bias", "q_norm.weight", "k_norm.weight"} <= keys
    assert "o_proj.bias" not in keys


def test_errors(device):
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(hidden_size=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        Attention(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="window_size"):
        Attention(hidden_size=32, num_heads=4, window_size=0)
    layer = make_layer(device)
    x = torch.randn(1, 4, H, device=device)
    mask = torch.tensor([[0, 1, 1, 1]], device=device)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, attention_mask=mask, cu_seqlens=torch.tensor([0, 4], device=device))
    with pytest.raises(ValueError, match="layer_idx"):
        make_layer(device, layer_idx=None)(x, past_key_values=Cache(), use_cache=True)
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(1, 4, 8, device=device))
    cache = Cache()
    layer(x, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="holds 1 sequences"):
        layer(torch.randn(2, 1, H, device=device), past_key_values=cache)


# ---------------------------------------------------------------------------------------------------------------
# reserve_cache: full attention decodes in place


def test_reserved_cache_decodes_in_place_and_matches_full_forward(device):
    """After ``reserve_cache`` the one-token steps (left padding, a row whose first steps are padding) write into
    the same tensors (data_ptr fixed), a chunked continuation too, and every real token's output equals the full
    forward; a step that does not store leaves the cache as it was; past the capacity a step concatenates."""
    layer = make_layer(device).eval()
    lens, T, prefill = [14, 9, 5], 14, 4
    x, mask = left_padded(lens, T, device)
    full, _, _ = layer(x, attention_mask=mask)
    with torch.no_grad():
        cache = Cache()
        outs = [layer(x[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache, use_cache=True)[0]]
        assert layer.reserve_cache(cache, T - 1) == T - 1 and layer.reserve_cache(cache, 3) == T - 1
        k, v = cache[0]["attn_state"]
        ptrs = (k.data_ptr(), v.data_ptr())
        assert k.shape[1] == T - 1
        for t in range(prefill, T - 4):
            if t == prefill:  # not storing: the same output, the cache untouched
                before = [s.clone() for s in cache[0]["attn_state"]] + [cache[0]["attn_lengths"].clone()]
                unstored, _, _ = layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
                after = [*cache[0]["attn_state"], cache[0]["attn_lengths"]]
                assert all(torch.equal(a, b) for a, b in zip(before, after))
            outs.append(layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                              use_cache=True)[0])
            if t == prefill:
                assert_close("not stored", unstored, outs[-1], 1e-6)
        outs.append(layer(x[:, T - 4:T - 1], attention_mask=mask[:, :T - 1], past_key_values=cache,
                          use_cache=True)[0])  # chunked, fills the capacity exactly
        assert tuple(s.data_ptr() for s in cache[0]["attn_state"]) == ptrs
        outs.append(layer(x[:, T - 1:], attention_mask=mask, past_key_values=cache, use_cache=True)[0])
        assert cache[0]["attn_state"][0].shape[1] == T  # no room left: concatenated
    out = torch.cat(outs, 1)
    assert cache.get_seq_length(0) == T and cache[0]["attn_lengths"].tolist() == lens
    for b, n in enumerate(lens):
        assert_close(f"row {b}", out[b, T - n:], full[b, T - n:], 1e-5)


def test_reserve_cache_errors(device):
    layer = make_layer(device).eval()
    with pytest.raises(ValueError, match="holds no state of layer 0"):
        layer.reserve_cache(Cache(), 8)
    cache = Cache()
    with torch.no_grad():
        layer(torch.randn(2, 3, H, device=device), past_key_values=cache, use_cache=True)
    for bad in (0, True, 4.0, None):
        with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
            layer.reserve_cache(cache, bad)
    with pytest.raises(ValueError, match="full attention.*window_size=3"):
        make_layer(device, window_size=3).reserve_cache(cache, 8)
