"""LTEAttention: padded == packed, the training/eval masks, and cached decoding step by step against a streaming
reference built from scratch (full-forward router scores, streaming top-b of the tokens that left the window)."""

import pytest
import torch

from fla.layers import LTEAttention
from fla.layers.lte_router import RoutingStats
from fla.models.utils import Cache
from fla.utils.testing import assert_close


def make_layer(window_size=5, buffer_size=3, sink_size=2, num_heads=4, num_kv_heads=2, hidden=32,
               conv_size=(3, 3), conv_dilation=(1, 2), device="cpu"):
    layer = LTEAttention(hidden_size=hidden, num_heads=num_heads, num_kv_heads=num_kv_heads, window_size=window_size,
                         conv_size=list(conv_size), conv_dilation=list(conv_dilation), dropout_prob=0.0,
                         buffer_size=buffer_size, sink_size=sink_size, layer_idx=0).to(device)
    with torch.no_grad():  # about half of the tokens positive, so that eviction decides something
        layer.router.conv_stack.proj.bias.zero_()
    return layer


def test_padded_equals_packed_and_stats(device):
    layer = make_layer(device=device).eval()
    lens, T = [11, 4, 8], 11
    x = torch.randn(3, T, 32, device=device)
    mask = torch.zeros(3, T, dtype=torch.bool, device=device)
    for b, n in enumerate(lens):
        mask[b, T - n:] = True
    o, stats, _ = layer(x, attention_mask=mask.long())
    assert isinstance(stats, RoutingStats) and stats.score.shape == (3, T, 2) and stats.margin == 3
    assert torch.isinf(stats.score[~mask]).all() and not stats.selected[~mask].any()
    cu = torch.tensor([0, 11, 15, 23], device=device)
    o_packed, stats_packed, _ = layer(x[mask][None], cu_seqlens=cu)
    assert_close("padded vs packed", o[mask][None], o_packed, 1e-5)
    assert torch.equal(stats.selected[mask][None], stats_packed.selected)
    for b, n in enumerate(lens):
        alone, _, _ = layer(x[b:b + 1, T - n:])
        assert_close(f"row {b}", o[b:b + 1, T - n:], alone, 1e-5)
    assert (o[~mask] == 0).all()


def test_training_keeps_every_selected_token_and_eval_caps(device):
    layer = make_layer(window_size=3, buffer_size=2, sink_size=1, device=device)
    x = torch.randn(1, 40, 32, device=device)
    layer.train()
    _, stats_train, _ = layer(x)
    layer.eval()
    _, stats_eval, _ = layer(x)
    assert torch.equal(stats_train.score, stats_eval.score)
    outside = stats_eval.selected[0, : 40 - 3 - 1]  # keys before the last query's window
    assert (outside.sum(0) <= 2).all() and outside[0].all()  # the cap includes the sink
    assert (stats_train.selected[0, :36].sum(0) >= outside.sum(0)).all()
    layer.router.enabled = False  # warm-up: everything is kept
    _, stats_off, _ = layer.train()(x)
    assert stats_off.selected.all()


def _reference_step(layer, xs, n, sink_size, buffer_size, window_size):
    """Output of the real token n of one row (xs [n+1, H] its real hidden states) under streaming eviction."""
    q, k, v = layer._project(xs[None])
    score = layer.router(k, v)[0]  # [n+1, H_kv], full forward
    q_rot, k_rot = layer.rotary(q, k, seqlen_offset=0)
    W1 = window_size + 1
    H, G = layer.num_kv_heads, layer.num_heads // layer.num_kv_heads
    out = []
    for h in range(H):
        visible = set(range(max(0, n - window_size), n + 1))
        cands = [(float("inf") if j < sink_size else float(score[j, h]), j) for j in range(0, n - W1 + 1)
                 if j < sink_size or score[j, h] > 0]
        visible |= {j for _, j in sorted(cands, reverse=True)[:buffer_size]}
        idx = torch.tensor(sorted(visible), device=xs.device)
        for g in range(G):
            qh = q_rot[0, n, h * G + g].double()
            logits = (k_rot[0, idx, h].double() @ qh) * layer.head_dim ** -0.5
            out.append(torch.softmax(logits, 0) @ v[0, idx, h].double())
    return layer.o_proj(torch.cat(out).float())


@pytest.mark.parametrize("window_size,buffer_size,sink_size", [(5, 3, 2), (3, 1, 0), (8, 6, 3)])
def test_cached_decode_matches_streaming_reference(device, window_size, buffer_size, sink_size):
    layer = make_layer(window_size, buffer_size, sink_size, device=device).eval()
    prompt_lens = [1, 2, int(torch.randint(3, 20, ())), 19]
    P, steps = max(prompt_lens), 24
    B = len(prompt_lens)
    x = torch.randn(B, P + steps, 32, device=device)
    mask = torch.ones(B, P + steps, dtype=torch.long, device=device)
    for b, n in enumerate(prompt_lens):
        mask[b, : P - n] = 0
    cache = Cache()
    with torch.no_grad():
        layer(x[:, :P], attention_mask=mask[:, :P], past_key_values=cache, use_cache=True)
        for t in range(P, P + steps):
            o, stats, _ = layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            assert stats is None
            state = cache[0]["lte_state"]
            assert (state["valid"][:, window_size + 1:].sum(1) <= buffer_size).all()
            for b in range(B):
                real = x[b, : t + 1][mask[b, : t + 1].bool()]
                ref = _reference_step(layer, real, real.shape[0] - 1, sink_size, buffer_size, window_size)
                assert_close(f"step {t} row {b}", o[b, 0], ref, 1e-4)
    assert cache.get_seq_length(0) == P + steps


def test_sinks_survive_short_prompts(device):
    """Prompts shorter than sink_size: later tokens become the remaining sinks and are never evicted."""
    layer = make_layer(window_size=3, buffer_size=3, sink_size=3, device=device).eval()
    with torch.no_grad():
        layer.router.conv_stack.proj.bias.fill_(-20.0)  # nothing positive: only sinks can be kept
    x = torch.randn(1, 30, 32, device=device)
    cache = Cache()
    with torch.no_grad():
        layer(x[:, :1], past_key_values=cache, use_cache=True)
        for t in range(1, 30):
            layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)
    state = cache[0]["lte_state"]
    buf = slice(4, None)
    assert state["valid"][0, buf].all() and state["sink"][0, buf].all()


def test_plain_forward_continuing_a_cache_equals_decode_steps(device):
    layer = make_layer(device=device).eval()
    x = torch.randn(2, 20, 32, device=device)
    with torch.no_grad():
        c1 = Cache()
        layer(x[:, :8], past_key_values=c1, use_cache=True)
        o_chunk, _, _ = layer(x[:, 8:], past_key_values=c1, use_cache=True)
        c2 = Cache()
        layer(x[:, :8], past_key_values=c2, use_cache=True)
        steps = [layer(x[:, t:t + 1], past_key_values=c2, use_cache=True)[0] for t in range(8, 20)]
    assert_close("chunk vs steps", o_chunk, torch.cat(steps, 1), 1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="window_size"):
        make_layer(window_size=1)  # below the router margin 3
    with pytest.raises(ValueError, match="buffer_size"):
        make_layer(buffer_size=-1)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LTEAttention(hidden_size=32, num_heads=4, num_kv_heads=3)


def test_decode_state_keeps_its_storage(device):
    """Every tensor of the layer's decode state is updated in place (what CUDA-graph replay of a step needs)."""
    layer = make_layer(device=device).eval()
    x = torch.randn(2, 30, 32, device=device)
    cache = Cache()
    with torch.no_grad():
        layer(x[:, :9], past_key_values=cache, use_cache=True)
        layer(x[:, 9:10], past_key_values=cache, use_cache=True)
        ptrs = {name: t.data_ptr() for name, t in cache[0]["lte_state"].items()}
        for t in range(10, 30):
            layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)
    assert {name: t.data_ptr() for name, t in cache[0]["lte_state"].items()} == ptrs
    assert int(cache[0]["lte_state"]["pos"][0]) == 30


def test_long_prompt_and_500_steps_retained_set_is_streaming_top_b(device):
    """A 2,000-token prompt and a 1-token prompt (left-padded) followed by 500 decode steps: after every step the
    buffer holds exactly the streaming top-b (sinks first) of the tokens that left the window, by full-forward
    score, and the output equals dense attention over that set plus the window."""
    w, b, s = 16, 8, 2
    layer = make_layer(window_size=w, buffer_size=b, sink_size=s, device=device).eval()
    P, steps = 2000, 500
    x = torch.randn(2, P + steps, 32, device=device)
    mask = torch.ones(2, P + steps, dtype=torch.long, device=device)
    mask[1, : P - 1] = 0
    cache = Cache()
    with torch.no_grad():
        layer(x[:, :P], attention_mask=mask[:, :P], past_key_values=cache, use_cache=True)
        full = [x[r, : P + steps][mask[r].bool()] for r in range(2)]
        q_all, k_all, v_all = zip(*(layer._project(f[None]) for f in full))
        scores = [layer.router(k, v)[0] for k, v in zip(k_all, v_all)]  # full-forward scores of whole rows
        for t in range(P, P + steps):
            o, _, _ = layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            state = cache[0]["lte_state"]
            for r in range(2):
                n = int(mask[r, : t + 1].sum()) - 1  # real index of the new token
                # right context of every evicted token is inside the first n + 1 tokens: the whole-row score holds
                score = scores[r]
                for h in range(layer.num_kv_heads):
                    cands = sorted(((float("inf") if j < s else float(score[j, h]), j) for j in range(n - w)
                                    if j < s or score[j, h] > 0), reverse=True)[:b]
                    want = sorted(j for _, j in cands)
                    keys = state["k_cache"][r, w + 1:, h][state["valid"][r, w + 1:, h]]
                    _, k_rot = layer.rotary(k_all[r][:, : n + 1], k_all[r][:, : n + 1], seqlen_offset=0)
                    got = sorted(int((k_rot[0, :, h] - key).abs().sum(-1).argmin()) for key in keys)
                    assert got == want, (t, r, h)
                if t % 100 == 0 or t == P + steps - 1:
                    ref = _reference_step(layer, full[r][: n + 1], n, s, b, w)
                    assert_close(f"step {t} row {r}", o[r, 0], ref, 1e-4)
