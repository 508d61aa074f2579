"""NativeSparseAttention layer: parameters, the reference computation, padding == packing == per-sequence runs,
cached decoding and chunked prefill == one pass with random left padding, the incrementally kept compressed cache;
the one-token decode step reads no device value on the host, ``reserve_cache`` keeps later steps in place."""

import pytest
import torch

from fla.layers.nsa import NativeSparseAttention
from fla.models.utils import Cache
from fla.ops.nsa import mean_pool_blocks, naive_nsa
from fla.utils.testing import assert_close, forbid_host_sync

H = 32
BS = 4


def make_layer(device, **kwargs):
    options = dict(hidden_size=H, num_heads=4, num_kv_heads=2, head_dim=8, block_size=BS, block_counts=3,
                   window_size=5, layer_idx=0)
    options.update(kwargs)
    return NativeSparseAttention(**options).to(device)


def left_mask(lens, T, device):
    mask = torch.zeros(len(lens), T, dtype=torch.long, device=device)
    for b, n in enumerate(lens):
        mask[b, T - n:] = 1
    return mask


def test_parameters_and_head_dim():
    layer = NativeSparseAttention(hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=16, layer_idx=0)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"q_proj.weight": (96, 48), "k_proj.weight": (32, 48), "v_proj.weight": (32, 48),
                      "g_proj.weight": (18, 48), "o_proj.weight": (48, 96)}
    paper = NativeSparseAttention(hidden_size=1024, num_heads=32, num_kv_heads=2, head_dim=64, block_size=64,
                                  block_counts=16, window_size=512, rope_theta=10000.0, max_position_embeddings=4096,
                                  layer_idx=1)
    assert sum(p.numel() for p in paper.parameters()) == 4_554_752
    with pytest.raises(ValueError, match="num_kv_heads"):
        NativeSparseAttention(hidden_size=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        NativeSparseAttention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=7)


def test_matches_reference(device):
    layer = make_layer(device)
    x = torch.randn(2, 23, H, device=device)
    o, attentions, cache = layer(x)
    assert attentions is None and cache is None and o.shape == x.shape
    q, k, v, (gc, gs, gw) = layer._project(x)
    q, k = layer.rotary(q, k)
    ref = layer.o_proj(naive_nsa(q, k, v, gc, gs, gw, block_counts=3, block_size=BS, window_size=5).flatten(-2))
    assert_close("o", o, ref, 1e-5)
    o.sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("window_size", [5, 0])
def test_padded_equals_packed_equals_alone(device, window_size):
    layer = make_layer(device, window_size=window_size)
    lens, T = [13, 6, 10], 13
    x = torch.randn(3, T, H, device=device)
    mask = left_mask(lens, T, device)
    padded, _, _ = layer(x, attention_mask=mask)
    assert torch.equal(padded[mask == 0], torch.zeros_like(padded[mask == 0]))
    cu = torch.tensor([0, 13, 19, 29], device=device, dtype=torch.int32)
    packed, _, _ = layer(x[mask.bool()][None], cu_seqlens=cu)
    assert_close("padded vs packed", padded[mask.bool()][None], packed, 1e-5)
    for b in range(3):
        alone, _, _ = layer(x[b:b + 1, T - lens[b]:])
        assert_close(f"row {b}", padded[b:b + 1, T - lens[b]:], alone, 1e-5)


def check_compressed_cache(layer, cache):
    state = cache[layer.layer_idx]
    k, v = state["attn_state"]
    kc, vc = state["nsa_cmp_state"]
    for n, L in enumerate(state["attn_lengths"].tolist()):
        nb = L // layer.block_size
        assert_close(f"k_cmp row {n}", kc[n, :nb], mean_pool_blocks(k[n:n + 1, :L], layer.block_size)[0], 1e-6)
        assert_close(f"v_cmp row {n}", vc[n, :nb], mean_pool_blocks(v[n:n + 1, :L], layer.block_size)[0], 1e-6)


@pytest.mark.parametrize("window_size", [5, 0])
def test_cached_decoding_with_left_padding_matches_full_forward(device, window_size):
    layer = make_layer(device, window_size=window_size).eval()
    T, prefill = 26, 5
    lens = [T, int(torch.randint(1, T - prefill + 1, ())), int(torch.randint(1, T + 1, ())), 3]
    x = torch.randn(len(lens), T, H, device=device)
    mask = left_mask(lens, T, device)
    cache = Cache()
    with torch.no_grad():
        outs = [layer(x[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache, use_cache=True)[0]]
        for t in range(prefill, T):
            outs.append(layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                              use_cache=True)[0])
            check_compressed_cache(layer, cache)
        out = torch.cat(outs, 1)
        assert cache[0]["attn_lengths"].tolist() == lens
        for b, n in enumerate(lens):
            ref, _, _ = layer(x[b:b + 1, T - n:])
            assert_close(f"row {b}", out[b:b + 1, T - n:], ref, 1e-5)
            assert torch.equal(out[b, :T - n], torch.zeros_like(out[b, :T - n]))


def test_chunked_prefill_and_decoding_match_one_pass(device):
    layer = make_layer(device).eval()
    x = torch.randn(2, 30, H, device=device)
    with torch.no_grad():
        full, _, _ = layer(x)
        cache = Cache()
        pieces = [layer(x[:, :7], past_key_values=cache, use_cache=True)[0],
                  layer(x[:, 7:18], past_key_values=cache, use_cache=True)[0]]
        for t in range(18, 22):
            pieces.append(layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
        pieces.append(layer(x[:, 22:], past_key_values=cache, use_cache=True)[0])
        check_compressed_cache(layer, cache)
        assert_close("chunked", torch.cat(pieces, 1), full, 1e-5)
        # a forward without use_cache leaves the cache untouched
        before = [t.clone() for t in cache[0]["attn_state"]]
        layer(x[:, :1], past_key_values=cache, use_cache=False)
        assert all(torch.equal(a, b) for a, b in zip(before, cache[0]["attn_state"]))
        assert int(cache[0]["attn_lengths"][0]) == 30


def test_chunked_prefill_with_padding_and_packed_rows(device):
    layer = make_layer(device).eval()
    lens_a, lens_b = [6, 2], [5, 9]
    xa, xb = torch.randn(2, 6, H, device=device), torch.randn(2, 9, H, device=device)
    ma, mb = left_mask(lens_a, 6, device), left_mask(lens_b, 9, device)
    with torch.no_grad():
        cache = Cache()
        oa, _, _ = layer(xa, attention_mask=ma, past_key_values=cache, use_cache=True)
        ob, _, _ = layer(xb, attention_mask=torch.cat([ma, mb], 1), past_key_values=cache, use_cache=True)
        for b in range(2):
            seq = torch.cat([xa[b, 6 - lens_a[b]:], xb[b, 9 - lens_b[b]:]])[None]
            ref, _, _ = layer(seq)
            got = torch.cat([oa[b, 6 - lens_a[b]:], ob[b, 9 - lens_b[b]:]])[None]
            assert_close(f"row {b}", got, ref, 1e-5)
        # packed continuation of the same two rows
        cache2 = Cache()
        layer(xa, attention_mask=ma, past_key_values=cache2, use_cache=True)
        cu = torch.tensor([0, 5, 14], device=device)
        op, _, _ = layer(xb[mb.bool()][None], cu_seqlens=cu, past_key_values=cache2, use_cache=True)
        assert_close("packed continuation", op[0], ob[mb.bool()], 1e-5)


def test_cache_grows_by_blocks_not_per_token(device):
    layer = make_layer(device).eval()
    cache = Cache()
    with torch.no_grad():
        layer(torch.randn(1, 3, H, device=device), past_key_values=cache, use_cache=True)
        caps = set()
        for _ in range(60):
            layer(torch.randn(1, 1, H, device=device), past_key_values=cache, use_cache=True)
            k = cache[0]["attn_state"][0]
            caps.add(k.shape[1])
            assert k.shape[1] % BS == 0 and cache[0]["nsa_cmp_state"][0].shape[1] == k.shape[1] // BS
    assert len(caps) < 10  # geometric growth: a handful of reallocations for 60 steps


def test_triton_backend_matches_torch_backend(monkeypatch, device):
    """Training forward and backward: the Triton path (interpreted on the CPU) equals the torch path."""
    layer = make_layer(device)
    x = torch.randn(2, 19, H, device=device)
    mask = left_mask([19, 11], 19, device)
    outs, grads = [], []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FLA_BACKEND", backend)
        layer.zero_grad()
        o, _, _ = layer(x, attention_mask=mask)
        o.square().sum().backward()
        outs.append(o.detach())
        grads.append([p.grad.clone() for p in layer.parameters()])
    tol = 1e-5 if device == "cpu" else 1e-4  # float32 on the GPU: different summation orders
    assert_close("o", outs[1], outs[0], tol)
    for (name, _), a, b in zip(layer.named_parameters(), grads[1], grads[0]):
        assert_close(f"d{name}", a, b, tol)


# ---------------------------------------------------------------------------------------------------------------
# the one-token decode step: no host synchronisation, padding steps, reserve_cache


def cache_tensors(cache, layer_idx=0):
    state = cache[layer_idx]
    return (*state["attn_state"], *state["nsa_cmp_state"])


@pytest.mark.parametrize("mask_kind", ["none", "left_padded", "padding_steps"])
def test_decode_step_reads_no_device_value_on_the_host(device, mask_kind):
    """After the prefill, decode steps (growing the cache, completing blocks, with and without a mask, storing or
    not) never read a device value on the host. With ``padding_steps`` some rows get padding tokens between real
    ones: those output zero, keep their length, and the real tokens equal a forward over the real tokens alone."""
    layer = make_layer(device).eval()
    prefill, steps = 7, 9  # capacity 8 after the prefill: the steps grow it and complete blocks
    T = prefill + steps
    x = torch.randn(3, T, H, device=device)
    mask = torch.ones(3, T, dtype=torch.long, device=device)
    if mask_kind != "none":
        mask[:, :prefill] = left_mask([7, 3, 5], prefill, device)
    if mask_kind == "padding_steps":
        mask[1, [8, 9, 13]] = 0
        mask[2, T - 1] = 0
    cache = Cache()
    with torch.no_grad():
        m = None if mask_kind == "none" else mask
        outs = [layer(x[:, :prefill], attention_mask=None if m is None else m[:, :prefill], past_key_values=cache,
                      use_cache=True)[0]]
        with forbid_host_sync():
            for t in range(prefill, T):
                outs.append(layer(x[:, t:t + 1], attention_mask=None if m is None else m[:, :t + 1],
                                  past_key_values=cache, use_cache=True)[0])
            layer(x[:, -1:], attention_mask=None if m is None else m, past_key_values=cache, use_cache=False)
        out = torch.cat(outs, 1)
        lens = mask.sum(1).tolist()
        assert cache[0]["attn_lengths"].tolist() == lens
        check_compressed_cache(layer, cache)
        for b in range(3):
            real = mask[b].bool()
            ref, _, _ = layer(x[b:b + 1, real])
            assert_close(f"row {b}", out[b:b + 1, real], ref, 1e-5)
            assert torch.equal(out[b, ~real], torch.zeros_like(out[b, ~real]))


def test_reserve_cache_then_decoding_writes_in_place(device):
    layer = make_layer(device).eval()
    prefill, T = 5, 25
    x = torch.randn(2, T, H, device=device)
    cache = Cache()
    with torch.no_grad():
        outs = [layer(x[:, :prefill], past_key_values=cache, use_cache=True)[0]]
        assert layer.reserve_cache(cache, T) == 28  # rounded up to block_size
        assert cache.get_seq_length(0) == prefill and cache[0]["attn_lengths"].tolist() == [prefill] * 2
        pointers = [t.data_ptr() for t in cache_tensors(cache)]
        for t in range(prefill, T):
            outs.append(layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
            assert [t.data_ptr() for t in cache_tensors(cache)] == pointers
        assert layer.reserve_cache(cache, 3) == 28  # already large enough: left as it is
        assert [t.data_ptr() for t in cache_tensors(cache)] == pointers
        full, _, _ = layer(x)
    assert_close("reserved decoding", torch.cat(outs, 1), full, 1e-5)
    check_compressed_cache(layer, cache)


def test_decode_step_without_use_cache_leaves_the_cache_untouched(device):
    """A decode step that does not store writes into copies, also when no growth is needed (after reserve_cache)
    and when its token completes a block."""
    layer = make_layer(device).eval()
    x = torch.randn(2, 8, H, device=device)
    cache = Cache()
    with torch.no_grad():
        layer(x[:, :7], past_key_values=cache, use_cache=True)
        layer.reserve_cache(cache, 16)
        before = [t.clone() for t in cache_tensors(cache)] + [cache[0]["attn_lengths"].clone()]
        o, _, _ = layer(x[:, 7:], past_key_values=cache, use_cache=False)
        after = list(cache_tensors(cache)) + [cache[0]["attn_lengths"]]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert cache.get_seq_length(0) == 7
        stored, _, _ = layer(x[:, 7:], past_key_values=cache, use_cache=True)
    assert torch.equal(o, stored)


def test_reserve_cache_argument_errors():
    layer = make_layer("cpu")
    cache = Cache()
    with pytest.raises(ValueError, match="no state of layer 0"):
        layer.reserve_cache(cache, 10)
    with pytest.raises(ValueError, match="no state of layer 0"):
        layer.reserve_cache(None, 10)
    with torch.no_grad():
        layer(torch.randn(1, 3, H), past_key_values=cache, use_cache=True)
    for bad in (0, -4, 2.5, True, "10", None):
        with pytest.raises(ValueError, match="capacity"):
            layer.reserve_cache(cache, bad)
    with pytest.raises(ValueError, match="layer_idx"):
        make_layer("cpu", layer_idx=None).reserve_cache(cache, 8)


def test_cached_decoding_triton_backend_matches_torch_backend(monkeypatch, device):
    """The decode steps with the Triton cache append and decode kernels (interpreted on the CPU) give the outputs
    and caches of the torch path."""
    layer = make_layer(device).eval()
    prefill, T = 6, 11
    x = torch.randn(2, T, H, device=device)
    mask = left_mask([T, T - 4], T, device)
    mask[1, 8] = 0  # a padding step
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FLA_BACKEND", backend)
        cache = Cache()
        with torch.no_grad():
            outs = [layer(x[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache, use_cache=True)[0]]
            for t in range(prefill, T):
                outs.append(layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                                  use_cache=True)[0])
        results.append((torch.cat(outs, 1), cache_tensors(cache), cache[0]["attn_lengths"]))
    (o_t, c_t, l_t), (o_g, c_g, l_g) = results
    assert_close("o", o_g, o_t, 1e-5 if device == "cpu" else 1e-4)
    assert torch.equal(l_g, l_t)
    for name, a, b in zip(["k", "v", "k_cmp", "v_cmp"], c_g, c_t):
        assert_close(name, a, b, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "left_padded"])
def test_decode_step_has_no_host_sync_on_gpu(padded):
    """On CUDA (Triton cache append), decode steps after reserve_cache run under torch.cuda.set_sync_debug_mode
    ('error') and equal the full forward."""
    layer = make_layer("cuda", block_size=16, block_counts=4, window_size=32).eval()
    prefill, T = 40, 100
    lens = [T, T - 17] if padded else [T, T]  # without a mask every row is T real tokens
    x = torch.randn(2, T, H, device="cuda")
    mask = left_mask(lens, T, "cuda") if padded else None
    cache = Cache()
    with torch.no_grad():
        outs = [layer(x[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill],
                      past_key_values=cache, use_cache=True)[0]]
        layer.reserve_cache(cache, T)
        outs.append(layer(x[:, prefill:prefill + 1], attention_mask=None if mask is None else mask[:, :prefill + 1],
                          past_key_values=cache, use_cache=True)[0])  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with forbid_host_sync():
                for t in range(prefill + 1, T):
                    outs.append(layer(x[:, t:t + 1], attention_mask=None if mask is None else mask[:, :t + 1],
                                      past_key_values=cache, use_cache=True)[0])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        out = torch.cat(outs, 1)
        for b, n in enumerate(lens):
            ref, _, _ = layer(x[b:b + 1, T - n:])
            assert_close(f"row {b}", out[b:b + 1, T - n:], ref, 1e-4)
