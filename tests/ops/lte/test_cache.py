"""LTE cache: lte_cache_step (both backends) against a plain-python streaming top-b reference, step by step;
lte_cache_prefill == token-by-token steps from an empty cache; sinks, buffer_size 0, ties; validation errors."""

import math

import pytest
import torch

from fla.ops.lte.cache import lte_cache_prefill, lte_cache_step, lte_empty_cache

INF = float("inf")


def make_stream(B, L, H, D, V, n_pads, n_sinks, dtype=torch.float32, device="cpu"):
    """Random tokens; token id c + 1 in channel 0 of v (and of k) identifies position c. Scores are distinct, about
    a third <= 0. Row b has n_pads[b] left pads; its first n_sinks valid tokens are sinks."""
    ids = torch.arange(1, L + 1, dtype=torch.float32, device=device)[None, :, None].expand(B, L, H)
    k = torch.randn(B, L, H, D, device=device)
    v = torch.randn(B, L, H, V, device=device)
    k[..., 0], v[..., 0] = ids, ids
    n = B * L * H
    score = (torch.randperm(n, device=device).float() / n - 0.33).reshape(B, L, H)
    pos = torch.arange(L, device=device)[None]
    pads = torch.tensor(n_pads, device=device)[:, None]
    valid = pos >= pads
    sink = valid & (pos < pads + n_sinks)
    return k.to(dtype), v.to(dtype), score, sink, valid


class StreamReference:
    """Per (row, head) lists: a ring of W1 token records and an unordered buffer of at most b records."""

    def __init__(self, B, H, W1, b):
        self.W1, self.b = W1, b
        self.ring = [[[None] * W1 for _ in range(H)] for _ in range(B)]
        self.buffer = [[[] for _ in range(H)] for _ in range(B)]

    def step(self, c, tokens):
        """tokens[b][h] = (id, score, sink, valid) of the token at position c."""
        slot = c % self.W1
        for b, row in enumerate(tokens):
            for h, tok in enumerate(row):
                out = self.ring[b][h][slot]
                if out is not None:
                    tid, s, is_sink, ok = out
                    if ok and (is_sink or s > 0):
                        prio = INF if is_sink else s
                        buf = self.buffer[b][h]
                        if len(buf) < self.b:
                            buf.append((prio, tid, s))
                        elif self.b > 0:
                            j = min(range(len(buf)), key=lambda i: buf[i][0])
                            if prio > buf[j][0]:  # strict: a tie keeps the incumbent
                                buf[j] = (prio, tid, s)
                self.ring[b][h][slot] = tok

    def buffer_set(self, b, h):
        return sorted((tid, s) for _, tid, s in self.buffer[b][h])


def cache_buffer_set(cache, b, h, W1):
    k_c, v_c, score, sink, valid = cache
    keep = valid[b, W1:, h]
    ids = v_c[b, W1:, h, 0][keep].float().tolist()
    scores = score[b, W1:, h][keep].tolist()
    return sorted(zip((int(round(i)) for i in ids), scores))


def run_steps(k, v, score, sink, valid, window_size, buffer_size, on_step=None):
    """lte_cache_step token by token from an empty cache, writing each token's score right after its step."""
    B, L, H, D = k.shape
    W1 = window_size + 1
    cache = lte_empty_cache(B, window_size, buffer_size, H, D, v.shape[-1], k.dtype, k.device)
    for c in range(L):
        slot = torch.full((B,), c % W1, dtype=torch.int64, device=k.device)
        lte_cache_step(*cache, slot, k[:, c], v[:, c], valid[:, c], sink[:, c], window_size)
        assert torch.isneginf(cache[2][:, c % W1]).all(), "a new token must enter with score -inf"
        cache[2][:, c % W1] = score[:, c].float().masked_fill(~valid[:, c, None], -INF)
        if on_step is not None:
            on_step(c, cache)
    return cache


STREAM_CASES = [  # (B, H, D, V, W1, b, L, n_pads, n_sinks, dtype)
    (2, 2, 16, 16, 5, 3, 70, [0, 7], 2, torch.float32),
    (3, 1, 32, 48, 9, 7, 80, [0, 3, 20], 0, torch.float32),
    (1, 2, 48, 16, 17, 33, 120, [5], 3, torch.float32),
    (2, 1, 16, 32, 5, 1, 60, [0, 2], 1, torch.float32),
    (2, 2, 16, 16, 6, 0, 60, [0, 4], 2, torch.float32),
    (2, 2, 32, 32, 11, 7, 90, [0, 9], 2, torch.bfloat16),  # ids <= 256 are exact in bf16
]


@pytest.mark.parametrize("B,H,D,V,W1,b,L,n_pads,n_sinks,dtype", STREAM_CASES,
                         ids=[f"B{c[0]}H{c[1]}D{c[2]}V{c[3]}W{c[4]}b{c[5]}L{c[6]}s{c[8]}-{str(c[9])[6:]}"
                              for c in STREAM_CASES])
def test_step_matches_streaming_reference(backend, device, B, H, D, V, W1, b, L, n_pads, n_sinks, dtype):
    k, v, score, sink, valid = make_stream(B, L, H, D, V, n_pads, n_sinks, dtype, device)
    ref = StreamReference(B, H, W1, b)

    def check(c, cache):
        tokens = [[(c + 1, score[r, c, h].item(), bool(sink[r, c]), bool(valid[r, c])) for h in range(H)]
                  for r in range(B)]
        ref.step(c, tokens)
        for r in range(B):
            for h in range(H):
                got, want = cache_buffer_set(cache, r, h, W1), ref.buffer_set(r, h)
                assert got == want, f"step {c}, row {r}, head {h}: buffer {got} != reference {want}"

    cache = run_steps(k, v, score, sink, valid, W1 - 1, b, on_step=check)
    k_c, v_c, s_c, sink_c, valid_c = cache
    # every valid slot holds an exact copy of its token's key, value and sink flag
    for r in range(B):
        for h in range(H):
            for s in range(W1 + b):
                if valid_c[r, s, h]:
                    c = int(round(v_c[r, s, h, 0].item())) - 1
                    assert torch.equal(k_c[r, s, h], k[r, c, h]) and torch.equal(v_c[r, s, h], v[r, c, h])
                    assert bool(sink_c[r, s, h]) == bool(sink[r, c]) and s_c[r, s, h].item() == score[r, c, h].item()
                else:
                    assert not sink_c[r, s, h]
    if n_sinks <= b:  # sinks never leave the buffer
        for r in range(B):
            for h in range(H):
                held = set(int(round(i)) for i in v_c[r, W1:, h, 0][valid_c[r, W1:, h] & sink_c[r, W1:, h]].tolist())
                n_out = sum(1 for c in range(L - W1) if sink[r, c])
                assert len(held) == n_out


def test_step_per_row_slots_and_strides(backend, device):
    """Rows may sit at different ring slots; the cache may be a (non-contiguous) head slice of a larger one."""
    from fla.ops.lte.cache import lte_cache_step_torch

    B, H, D, V, W1, b = 3, 2, 16, 24, 5, 3
    big = lte_empty_cache(B, W1 - 1, b, H + 2, D, V, torch.float32, device)
    cache = tuple(t[:, :, 1:1 + H] for t in big)
    torch_cache = tuple(t.clone() for t in cache)
    for step in range(12):
        slot = torch.tensor([(step + r) % W1 for r in range(B)], device=device)
        new_k, new_v = torch.randn(B, H, D, device=device), torch.randn(B, H, V, device=device)
        new_valid = torch.tensor([True, step % 4 != 0, True], device=device)
        new_sink = torch.tensor([step < 2, False, step == 3], device=device)
        lte_cache_step(*cache, slot, new_k, new_v, new_valid, new_sink, W1 - 1)
        lte_cache_step_torch(*torch_cache, slot, new_k, new_v, new_valid, new_sink, W1 - 1)
        fresh = torch.randn(B, H, device=device)
        cache[2][torch.arange(B), slot] = fresh
        torch_cache[2][torch.arange(B), slot] = fresh
        for got, want in zip(cache, torch_cache):
            assert torch.equal(got, want)
    assert torch.isneginf(big[2][:, :, 0]).all() and torch.isneginf(big[2][:, :, -1]).all(), "other heads touched"
    assert not big[4][:, :, 0].any() and not big[4][:, :, -1].any()


def test_step_triton_path_is_taken(monkeypatch, device):
    import fla.ops.lte.cache as cache_mod

    monkeypatch.setenv("FLA_BACKEND", "triton")
    monkeypatch.setattr(cache_mod, "lte_cache_step_torch", None)
    B, H, D, w, b = 2, 2, 16, 3, 3
    k, v, score, sink, valid = make_stream(B, 20, H, D, D, [0, 2], 1, torch.float32, device)
    compare_caches(run_steps(k, v, score, sink, valid, w, b), lte_cache_prefill(k, v, score, sink, valid, w, b), w + 1)


# ----------------------------------------------------------------------------------------------------- prefill

def compare_caches(got, want, W1):
    k_g, v_g, s_g, sink_g, valid_g = got
    k_w, v_w, s_w, sink_w, valid_w = want
    ring = slice(0, W1)
    for name, a, b in (("k", k_g, k_w), ("v", v_g, v_w), ("score", s_g, s_w), ("sink", sink_g, sink_w),
                       ("valid", valid_g, valid_w)):
        assert torch.equal(a[:, ring], b[:, ring]), f"ring {name} differs"
    B, S, H = s_g.shape
    for r in range(B):
        for h in range(H):
            entries = []
            for k_c, v_c, s_c, sink_c, valid_c in (got, want):
                keep = valid_c[r, W1:, h]
                order = v_c[r, W1:, h, 0][keep].float().argsort()
                entries.append([t[r, W1:, h][keep][order] for t in (k_c, v_c, s_c, sink_c)])
            for a, b in zip(*entries):
                assert torch.equal(a, b), f"buffer of row {r}, head {h} differs"


PREFILL_CASES = [  # (B, H, D, V, window_size, b, L, n_pads, n_sinks)
    (2, 2, 16, 16, 4, 3, 3, [0, 1], 1),      # L < W1
    (2, 2, 16, 16, 4, 3, 5, [0, 2], 1),      # L == W1
    (3, 1, 32, 16, 4, 3, 70, [0, 5, 30], 2),  # L >> W1
    (1, 2, 16, 48, 0, 7, 40, [3], 2),        # window_size 0
    (2, 1, 16, 16, 8, 0, 50, [0, 10], 3),    # buffer_size 0
    (2, 2, 16, 16, 6, 33, 45, [0, 4], 2),    # buffer_size > number of candidates
    (2, 2, 48, 32, 39, 7, 150, [0, 60], 3),
    (1, 1, 16, 16, 3, 1, 30, [28], 4),       # almost all pads
]


@pytest.mark.parametrize("B,H,D,V,window_size,b,L,n_pads,n_sinks", PREFILL_CASES,
                         ids=[f"B{c[0]}H{c[1]}w{c[4]}b{c[5]}L{c[6]}" for c in PREFILL_CASES])
def test_prefill_equals_steps(device, B, H, D, V, window_size, b, L, n_pads, n_sinks):
    k, v, score, sink, valid = make_stream(B, L, H, D, V, n_pads, n_sinks, torch.float32, device)
    got = lte_cache_prefill(k, v, score, sink, valid, window_size, b)
    want = run_steps(k, v, score, sink, valid, window_size, b)
    assert all(t.shape[1] == window_size + 1 + b for t in got)
    compare_caches(got, want, window_size + 1)
    # documented buffer order: by position, empty slots last
    k_c, v_c, s_c, sink_c, valid_c = got
    W1 = window_size + 1
    for r in range(B):
        for h in range(H):
            ids = v_c[r, W1:, h, 0]
            n = int(valid_c[r, W1:, h].sum())
            assert valid_c[r, W1:W1 + n, h].all()
            assert (ids[:n].diff() > 0).all()


def test_prefill_then_steps_equal_steps(backend, device):
    """A prompt through prefill, then decode steps, equals steps from the start."""
    B, H, D, V, w, b, L0, L = 2, 2, 16, 16, 6, 5, 40, 70
    k, v, score, sink, valid = make_stream(B, L, H, D, V, [0, 11], 2, torch.float32, device)
    cache = lte_cache_prefill(k[:, :L0], v[:, :L0], score[:, :L0], sink[:, :L0], valid[:, :L0], w, b)
    for c in range(L0, L):
        slot = torch.full((B,), c % (w + 1), device=device)
        lte_cache_step(*cache, slot, k[:, c], v[:, c], valid[:, c], sink[:, c], w)
        cache[2][:, c % (w + 1)] = score[:, c].masked_fill(~valid[:, c, None], -INF)
    compare_caches(cache, run_steps(k, v, score, sink, valid, w, b), w + 1)


@pytest.mark.parametrize("b", [2, 4])
def test_sinks_never_evicted(backend, device, b):
    """With sinks <= b every sink that left the window stays, even against many high scores; prefill agrees."""
    B, H, D, w, L = 2, 2, 16, 3, 60
    k, v, score, sink, valid = make_stream(B, L, H, D, D, [0, 5], 2, torch.float32, device)
    score = score.abs() + 1.0  # every token selected, all scores high
    score[:, :8] = -1.0  # the sinks themselves score badly
    cache = run_steps(k, v, score, sink, valid, w, b)
    pre = lte_cache_prefill(k, v, score, sink, valid, w, b)
    for c_ in (cache, pre):
        held_sinks = (c_[3][:, w + 1:] & c_[4][:, w + 1:]).sum(1)
        assert (held_sinks == 2).all()
        assert c_[4][:, w + 1:].all()  # the buffer is full


def test_more_sinks_than_buffer_keeps_earliest(backend, device):
    """sinks > b: the b earliest sinks stay (a tie at +inf keeps the incumbent); prefill does the same."""
    B, H, D, w, b, L = 1, 1, 16, 2, 2, 20
    k, v, score, sink, valid = make_stream(B, L, H, D, D, [1], 5, torch.float32, device)
    cache = run_steps(k, v, score, sink, valid, w, b)
    pre = lte_cache_prefill(k, v, score, sink, valid, w, b)
    for c_ in (cache, pre):
        assert sorted(c_[1][0, w + 1:, 0, 0].tolist()) == [2.0, 3.0]  # positions 1, 2 (position 0 is a pad)


def test_tie_behaviour(backend, device):
    """Documented: with equal non-sink scores at the cut-off both keep the same multiset of scores, but prefill keeps
    the earliest tokens while streaming evicts the tied token in the lowest buffer slot."""
    B, H, D, w, b = 1, 1, 16, 0, 2
    L = 4  # scores 1 (A), 1 (B), 2 (C), then one more token so that C leaves the ring
    k = torch.randn(B, L, H, D, device=device)
    v = torch.arange(1, L + 1, dtype=torch.float32, device=device)[None, :, None, None].expand(B, L, H, D).clone()
    score = torch.tensor([1.0, 1.0, 2.0, 0.5], device=device)[None, :, None]
    sink = torch.zeros(B, L, dtype=torch.bool, device=device)
    valid = torch.ones(B, L, dtype=torch.bool, device=device)
    steps = run_steps(k, v, score, sink, valid, w, b)
    pre = lte_cache_prefill(k, v, score, sink, valid, w, b)
    assert sorted(steps[2][0, 1:, 0].tolist()) == sorted(pre[2][0, 1:, 0].tolist()) == [1.0, 2.0]
    assert sorted(steps[1][0, 1:, 0, 0].tolist()) == [2.0, 3.0]  # A (id 1) was in slot 0 and got evicted
    assert sorted(pre[1][0, 1:, 0, 0].tolist()) == [1.0, 3.0]  # earliest tied token kept


def test_unscored_and_nonpositive_tokens_are_dropped(backend, device):
    """A token that leaves with score -inf (never scored), 0 or NaN is not kept."""
    B, H, D, w, b = 1, 1, 16, 0, 3
    cache = lte_empty_cache(B, w, b, H, D, D, torch.float32, device)
    for c, s in enumerate([None, 0.0, float("nan"), -0.5, 0.25, 0.0]):
        slot = torch.zeros(B, dtype=torch.long, device=device)
        lte_cache_step(*cache, slot, torch.full((B, H, D), c + 1.0, device=device),
                       torch.full((B, H, D), c + 1.0, device=device), torch.ones(B, dtype=torch.bool, device=device),
                       torch.zeros(B, dtype=torch.bool, device=device), w)
        if s is not None:
            cache[2][:, 0] = s
    assert cache[4][0, 1:, 0].tolist() == [True, False, False]
    assert cache[1][0, 1, 0, 0].item() == 5.0


# -------------------------------------------------------------------------------------------------------- errors

def test_cache_errors(device):
    B, H, D, V, w, b = 2, 2, 16, 8, 3, 2
    cache = lte_empty_cache(B, w, b, H, D, V, torch.float32, device)
    args = dict(slot=torch.zeros(B, dtype=torch.long, device=device), new_k=torch.randn(B, H, D, device=device),
                new_v=torch.randn(B, H, V, device=device), new_valid=torch.ones(B, dtype=torch.bool, device=device),
                new_sink=torch.zeros(B, dtype=torch.bool, device=device), window_size=w)

    def step(cache=cache, **over):
        lte_cache_step(*cache, **{**args, **over})

    with pytest.raises(ValueError, match="new_k must have shape"):
        step(new_k=torch.randn(B, H, D + 1, device=device))
    with pytest.raises(ValueError, match="new_v has dtype"):
        step(new_v=torch.randn(B, H, V, device=device).bfloat16())
    with pytest.raises(ValueError, match="slot has dtype"):
        step(slot=torch.zeros(B, device=device))
    with pytest.raises(ValueError, match="slot must have shape"):
        step(slot=torch.zeros(B + 1, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="new_valid has dtype"):
        step(new_valid=torch.ones(B, device=device))
    with pytest.raises(ValueError, match="window_size"):
        step(window_size=w + b + 1)
    with pytest.raises(ValueError, match="window_size"):
        step(window_size=-1)
    with pytest.raises(ValueError, match="score has dtype"):
        step(cache=(cache[0], cache[1], cache[2].double(), cache[3], cache[4]))
    with pytest.raises(ValueError, match="sink must have shape"):
        step(cache=(cache[0], cache[1], cache[2], cache[3][:, :3], cache[4]))
    with pytest.raises(ValueError, match="v_cache has dtype"):
        step(cache=(cache[0], cache[1].half(), cache[2], cache[3], cache[4]))
    with pytest.raises(ValueError, match="k_cache has dtype"):
        step(cache=(cache[0].long(), cache[1], cache[2], cache[3], cache[4]))

    L = 9
    k, v = torch.randn(B, L, H, D, device=device), torch.randn(B, L, H, V, device=device)
    score, sink = torch.randn(B, L, H, device=device), torch.zeros(B, L, dtype=torch.bool, device=device)
    valid = torch.ones(B, L, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="v must have shape"):
        lte_cache_prefill(k, v[:, :3], score, sink, valid, w, b)
    with pytest.raises(ValueError, match="sink must have shape"):
        lte_cache_prefill(k, v, score, sink[..., None], valid, w, b)
    with pytest.raises(ValueError, match="valid has dtype"):
        lte_cache_prefill(k, v, score, sink, valid.float(), w, b)
    with pytest.raises(ValueError, match="buffer_size"):
        lte_cache_prefill(k, v, score, sink, valid, w, -1)
    with pytest.raises(ValueError, match="window_size"):
        lte_cache_prefill(k, v, score, sink, valid, 1.5, b)
    with pytest.raises(ValueError, match="buffer_size"):
        lte_empty_cache(B, w, -2, H, D, V)


# ---------------------------------------------------------------------------------------------------- GPU (H100/H200)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_step_gpu_triton_vs_torch(monkeypatch, dtype):
    """B8 H16 D64, W1 = 769, b = 512: 2000 steps of the kernel against the torch path, bit for bit."""
    from fla.ops.lte.cache import lte_cache_step_torch

    monkeypatch.setenv("FLA_BACKEND", "triton")
    B, H, D, V, w, b, L = 8, 16, 64, 64, 768, 512, 2000
    k, v, score, sink, valid = make_stream(B, L, H, D, V, [0, 1, 5, 100, 0, 0, 3, 700], 4, dtype, "cuda")
    a = lte_empty_cache(B, w, b, H, D, V, dtype, "cuda")
    t = lte_empty_cache(B, w, b, H, D, V, dtype, "cuda")
    for c in range(L):
        slot = torch.full((B,), c % (w + 1), device="cuda")
        lte_cache_step(*a, slot, k[:, c], v[:, c], valid[:, c], sink[:, c], w)
        lte_cache_step_torch(*t, slot, k[:, c], v[:, c], valid[:, c], sink[:, c], w)
        a[2][:, c % (w + 1)] = score[:, c]
        t[2][:, c % (w + 1)] = score[:, c]
    for x, y in zip(a, t):
        assert torch.equal(x, y)
    assert math.isfinite(a[2][:, w + 1:][a[4][:, w + 1:]].min().item())


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_step_cuda_graph(monkeypatch, backend_name):
    """One step captured in a CUDA graph and replayed equals the eager step."""
    monkeypatch.setenv("FLA_BACKEND", backend_name)
    B, H, D, w, b = 4, 8, 64, 31, 16
    k, v, score, sink, valid = make_stream(B, 200, H, D, D, [0, 3, 0, 40], 2, torch.bfloat16, "cuda")
    eager = lte_empty_cache(B, w, b, H, D, D, torch.bfloat16, "cuda")
    graphed = lte_empty_cache(B, w, b, H, D, D, torch.bfloat16, "cuda")
    slot = torch.zeros(B, dtype=torch.long, device="cuda")
    nk, nv = k[:, 0].clone(), v[:, 0].clone()
    nvalid, nsink = valid[:, 0].clone(), sink[:, 0].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lte_cache_step(*[x.clone() for x in graphed], slot, nk, nv, nvalid, nsink, w)  # warm-up / compile
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lte_cache_step(*graphed, slot, nk, nv, nvalid, nsink, w)
    for c in range(200):
        slot.fill_(c % (w + 1))
        nk.copy_(k[:, c]), nv.copy_(v[:, c]), nvalid.copy_(valid[:, c]), nsink.copy_(sink[:, c])
        graph.replay()
        lte_cache_step(*eager, slot, k[:, c], v[:, c], valid[:, c], sink[:, c], w)
        graphed[2][:, c % (w + 1)] = score[:, c]
        eager[2][:, c % (w + 1)] = score[:, c]
    for x, y in zip(graphed, eager):
        assert torch.equal(x, y)
