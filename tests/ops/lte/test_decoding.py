"""lte_decoding_one_step: both backends against naive_lte_decoding and a float64 reference (GQA, odd sizes, rows
whose buffer is empty, a row with nothing valid); the Triton launcher's single-split and several-split paths forced,
on the cache's own layout and views of it; the cache after prefill; validation errors."""

import pytest
import torch

from fla.ops.lte.cache import lte_cache_prefill, lte_empty_cache
from fla.ops.lte.decoding import lte_decoding_one_step, naive_lte_decoding
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def reference64(q, k, v, valid, scale=None):
    B, _, HQ, D = q.shape
    G = HQ // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    s = torch.einsum("bhd,bshd->bhs", q[:, 0].double(), k.double().repeat_interleave(G, 2)) * scale
    ok = valid.repeat_interleave(G, 2).permute(0, 2, 1)
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhs,bshv->bhv", p, v.double().repeat_interleave(G, 2))[:, None]


def random_valid(B, W1, b, H, device):
    """Ring mostly valid (a few blank slots), buffer partly filled; row 1 (if any) has an empty buffer, the last row
    (if B == 3) has nothing valid."""
    ring = torch.rand(B, W1, H, device=device) < 0.8
    buf = torch.rand(B, b, H, device=device) < 0.5
    valid = torch.cat([ring, buf], 1)
    if B > 1:
        valid[1, W1:] = False
    if B == 3:
        valid[2] = False
    return valid


CASES = [  # (B, HQ, H, D, V, W1, b, dtype)
    (1, 1, 1, 16, 16, 5, 0, torch.float32),
    (2, 2, 1, 32, 16, 9, 3, torch.float32),
    (3, 4, 1, 48, 32, 17, 7, torch.float32),
    (3, 4, 2, 16, 48, 40, 33, torch.float32),
    (2, 2, 2, 32, 32, 33, 1, torch.float32),
    (3, 8, 2, 32, 32, 40, 33, torch.bfloat16),
    (2, 4, 1, 48, 16, 21, 7, torch.bfloat16),
    (3, 2, 1, 32, 32, 12, 5, torch.float16),
]


@pytest.mark.parametrize("B,HQ,H,D,V,W1,b,dtype", CASES,
                         ids=[f"B{c[0]}HQ{c[1]}H{c[2]}D{c[3]}V{c[4]}W{c[5]}b{c[6]}-{str(c[7])[6:]}" for c in CASES])
def test_decoding_matches_reference(backend, device, B, HQ, H, D, V, W1, b, dtype):
    S = W1 + b
    q = torch.randn(B, 1, HQ, D, device=device).to(dtype)
    k = torch.randn(B, S, H, D, device=device).to(dtype)
    v = torch.randn(B, S, H, V, device=device).to(dtype)
    valid = random_valid(B, W1, b, H, device)
    o = lte_decoding_one_step(q, k, v, valid)
    assert o.dtype == dtype and o.shape == (B, 1, HQ, V)
    assert_close("o", o, reference64(q, k, v, valid), TOL[dtype])
    assert_close("o vs naive", o, naive_lte_decoding(q, k, v, valid), TOL[dtype])
    if B == 3:
        assert torch.equal(o[2], torch.zeros_like(o[2])), "a row with nothing valid gives zeros"


def test_decoding_invalid_slots_are_ignored(backend, device):
    """Garbage (huge values) in invalid slots changes nothing; scale is honoured."""
    B, HQ, H, D, S = 2, 4, 2, 32, 30
    q = torch.randn(B, 1, HQ, D, device=device)
    k, v = torch.randn(B, S, H, D, device=device), torch.randn(B, S, H, D, device=device)
    valid = torch.rand(B, S, H, device=device) < 0.5
    k2, v2 = k.clone(), v.clone()
    k2[~valid], v2[~valid] = 1e4, -1e4
    o1 = lte_decoding_one_step(q, k, v, valid, scale=0.3)
    o2 = lte_decoding_one_step(q, k2, v2, valid, scale=0.3)
    assert_close("o", o2, o1, 1e-5)
    assert_close("o vs ref", o1, reference64(q, k, v, valid, 0.3), 1e-5)


def test_decoding_strided_cache(backend, device):
    """Caches that are head slices of larger tensors (non-contiguous)."""
    B, HQ, H, D, S = 2, 4, 2, 16, 37
    kb, vb = torch.randn(B, S, H + 1, D, device=device), torch.randn(B, S, H + 1, 24, device=device)
    vm = torch.rand(B, S, H + 1, device=device) < 0.7
    k, v, valid = kb[:, :, 1:], vb[:, :, 1:], vm[:, :, 1:]
    q = torch.randn(B, 1, HQ, D, device=device)
    assert_close("o", lte_decoding_one_step(q, k, v, valid), reference64(q, k, v, valid), 1e-5)


def test_decoding_after_prefill(backend, device):
    """Decoding the last prompt token over the prefilled cache == attention over its window plus the buffer."""
    B, L, HQ, H, D, w, b = 2, 50, 4, 2, 32, 7, 5
    k, v = torch.randn(B, L, H, D, device=device), torch.randn(B, L, H, D, device=device)
    score = torch.randn(B, L, H, device=device)
    valid = torch.arange(L, device=device)[None] >= torch.tensor([0, 13], device=device)[:, None]
    sink = valid & (valid.cumsum(1) <= 2)
    cache = lte_cache_prefill(k, v, score, sink, valid, w, b)
    q = torch.randn(B, 1, HQ, D, device=device)
    o = lte_decoding_one_step(q, cache[0], cache[1], cache[4])
    # the visible set from scratch: last w + 1 positions, plus the top-b selected before them
    vis = torch.zeros(B, L, H, dtype=torch.bool, device=device)
    vis[:, L - w - 1:] = valid[:, L - w - 1:, None]
    prio = torch.where(sink[..., None], float("inf"), score)
    prio = prio.masked_fill(~(valid[..., None] & (sink[..., None] | (score > 0))), float("-inf"))[:, :L - w - 1]
    top = prio.topk(b, dim=1)
    vis[:, :L - w - 1].scatter_(1, top.indices, top.values > float("-inf"))
    assert_close("o", o, reference64(q, k, v, vis), 1e-5)


class _Recorder:
    """Stands in for a Triton kernel: counts its launches and keeps the arguments of the last one."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.args = kernel, 0, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            self.args = args
            return self.kernel[grid](*args, **kwargs)

        return launch


def _record_launches(monkeypatch):
    """Wraps the attention decode kernels that LTE's Triton path launches; returns (split, combine) recorders."""
    import fla.ops.attn.decoding_kernels as attn_kernels

    split = _Recorder(attn_kernels._attn_decoding_split_kernel)
    combine = _Recorder(attn_kernels._attn_decoding_combine_kernel)
    monkeypatch.setattr(attn_kernels, "_attn_decoding_split_kernel", split)
    monkeypatch.setattr(attn_kernels, "_attn_decoding_combine_kernel", combine)
    return split, combine


SPLIT_CASES = [  # (B, HQ, H, D, V, W1, b, dtype)
    (3, 2, 2, 32, 32, 41, 26, torch.float32),  # G = 1, S = 67
    (3, 4, 2, 16, 48, 33, 20, torch.float32),  # G = 2, D != V, S = 53
    (3, 8, 2, 32, 32, 29, 0, torch.bfloat16),  # G = 4, no buffer, S = 29
    (3, 4, 1, 64, 64, 57, 44, torch.bfloat16),  # G = 4, one kv head, S = 101
]


@pytest.mark.parametrize("B,HQ,H,D,V,W1,b,dtype", SPLIT_CASES,
                         ids=[f"B{c[0]}HQ{c[1]}H{c[2]}D{c[3]}V{c[4]}W{c[5]}b{c[6]}-{str(c[7])[6:]}" for c in
                              SPLIT_CASES])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decoding_triton_splits(monkeypatch, device, B, HQ, H, D, V, W1, b, dtype, num_splits):
    """The attention decode kernel with LTE's valid mask: the single-split path (one launch that writes o) and
    several splits merged by the combine kernel. A cache from ``lte_empty_cache`` is read in place (no copy); a row
    and a kv head with no valid slot give zeros."""
    from fla.ops.lte.decoding_kernels import lte_decoding_fwd

    split, combine = _record_launches(monkeypatch)
    k, v, _, _, valid = lte_empty_cache(B, W1 - 1, b, H, D, V, dtype, device)
    k.normal_()
    v.normal_()
    valid.copy_(random_valid(B, W1, b, H, device))  # row 2: nothing valid
    valid[0, :, 0] = False  # row 0, kv head 0: nothing valid
    q = torch.randn(B, 1, HQ, D, device=device).to(dtype)
    o = lte_decoding_fwd(q, k, v, valid, D ** -0.5, _num_splits=num_splits)
    assert split.launches == 1 and combine.launches == (0 if num_splits == 1 else 1)
    assert split.args[1] is k and split.args[2] is v, "the LTE cache layout needs no copy"
    assert o.dtype == dtype and o.shape == (B, 1, HQ, V)
    assert_close("o", o, reference64(q, k, v, valid), TOL[dtype])
    assert torch.equal(o[2], torch.zeros_like(o[2])), "a row with nothing valid gives zeros"
    G = HQ // H
    assert torch.equal(o[0, :, :G], torch.zeros_like(o[0, :, :G])), "a kv head with nothing valid gives zeros"


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decoding_triton_cache_views(monkeypatch, device, num_splits):
    """Views of an LTE cache along B and S (and a valid mask with any strides) are read in place; a layout whose
    heads do not step by D (here [B, H, S, D] transposed) is copied by the launcher and still right."""
    from fla.ops.lte.decoding_kernels import lte_decoding_fwd

    split, _ = _record_launches(monkeypatch)
    B, HQ, H, D, W1, b = 4, 4, 2, 32, 21, 14
    k, v, _, _, valid = lte_empty_cache(B, W1 - 1, b, H, D, D, torch.float32, device)
    k.normal_()
    v.normal_()
    valid.copy_(random_valid(B, W1, b, H, device))
    q = torch.randn(B // 2, 1, HQ, D, device=device)
    kv, vv, mv = k[1::2, 3:], v[1::2, 3:], valid[1::2, 3:]
    o = lte_decoding_fwd(q, kv, vv, mv, 0.3, _num_splits=num_splits)
    assert split.args[1] is kv and split.args[2] is vv
    assert_close("o (B, S views)", o, reference64(q, kv, vv, mv, 0.3), 1e-5)

    S = W1 + b
    kt = torch.randn(B, H, S, D, device=device).transpose(1, 2)
    vt = torch.randn(B, H, S, D, device=device).transpose(1, 2)
    mt = (torch.rand(B, H, S, device=device) < 0.6).transpose(1, 2)
    q = torch.randn(B, 1, HQ, D, device=device)
    o = lte_decoding_fwd(q, kt, vt, mt, 0.3, _num_splits=num_splits)
    assert split.args[1] is not kt
    assert_close("o (heads not stepping by D)", o, reference64(q, kt, vt, mt, 0.3), 1e-5)


@pytest.mark.parametrize("HQ,H", [(4, 2), (2, 2)])
def test_decoding_triton_gpu_blocks(monkeypatch, device, HQ, H):
    """The kernel with the GPU's blocks (64 keys) over the paper's S = 769 + 512 slots, interpreted: in several splits
    through the public op (which really takes the Triton path), in three (as on an H200 at B8 H16), and in one."""
    import fla.ops.attn.decoding_kernels as attn_kernels
    import fla.ops.lte.decoding as decoding
    from fla.ops.lte.decoding_kernels import lte_decoding_fwd

    monkeypatch.setenv("FLA_BACKEND", "triton")
    monkeypatch.setattr(attn_kernels, "_tiles", lambda BK, BV, G, fp32, interpreting: (64, 4, 1))
    monkeypatch.setattr(decoding, "lte_decoding_one_step_torch", None)
    B, S, D = 2, 769 + 512, 64
    q = torch.randn(B, 1, HQ, D, device=device)
    k, v = torch.randn(B, S, H, D, device=device), torch.randn(B, S, H, D, device=device)
    valid = torch.rand(B, S, H, device=device) < 0.3
    valid[1, :700] = False
    ref = reference64(q, k, v, valid)
    assert_close("o", lte_decoding_one_step(q, k, v, valid), ref, 1e-5)
    assert_close("o (three splits)", lte_decoding_fwd(q, k, v, valid, D ** -0.5, _num_splits=3), ref, 1e-5)
    assert_close("o (one split)", lte_decoding_fwd(q, k, v, valid, D ** -0.5, _num_splits=1), ref, 1e-5)


def test_decoding_errors(device):
    q = torch.randn(2, 1, 4, 16, device=device)
    k = torch.randn(2, 10, 2, 16, device=device)
    v = torch.randn(2, 10, 2, 8, device=device)
    valid = torch.ones(2, 10, 2, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="one token"):
        lte_decoding_one_step(q.expand(2, 2, 4, 16), k, v, valid)
    with pytest.raises(ValueError, match="multiple"):
        lte_decoding_one_step(q[:, :, :3], k, v, valid)
    with pytest.raises(ValueError, match="v_cache must have shape"):
        lte_decoding_one_step(q, k, v[:, :5], valid)
    with pytest.raises(ValueError, match="k_cache must have shape"):
        lte_decoding_one_step(q, k[..., :8], v, valid)
    with pytest.raises(ValueError, match="v_cache has dtype"):
        lte_decoding_one_step(q, k, v.bfloat16(), valid)
    with pytest.raises(ValueError, match="valid has dtype"):
        lte_decoding_one_step(q, k, v, valid.float())
    with pytest.raises(ValueError, match="valid must have shape"):
        lte_decoding_one_step(q, k, v, valid[:, :9])
    with pytest.raises(ValueError, match="scale"):
        lte_decoding_one_step(q, k, v, valid, scale="big")
    with pytest.raises(ValueError, match="q has dtype"):
        lte_decoding_one_step(q.long(), k, v, valid)


# ---------------------------------------------------------------------------------------------------- GPU (H100/H200)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("HQ,H,D", [(16, 16, 64), (32, 8, 128), (16, 2, 64)])
def test_decoding_gpu(monkeypatch, HQ, H, D, dtype):
    """B8, W1 = 769, b = 512: the Triton kernel against the float64 reference and the torch path."""
    B, W1, b = 8, 769, 512
    S = W1 + b
    q = torch.randn(B, 1, HQ, D, device="cuda").to(dtype)
    k = torch.randn(B, S, H, D, device="cuda").to(dtype)
    v = torch.randn(B, S, H, D, device="cuda").to(dtype)
    valid = random_valid(B, W1, b, H, "cuda")
    valid[3] = False
    monkeypatch.setenv("FLA_BACKEND", "triton")
    o = lte_decoding_one_step(q, k, v, valid)
    monkeypatch.setenv("FLA_BACKEND", "torch")
    o_torch = lte_decoding_one_step(q, k, v, valid)
    assert_close("o", o, reference64(q, k, v, valid), TOL[dtype])
    assert_close("o vs torch", o, o_torch, TOL[dtype])
    assert torch.equal(o[3], torch.zeros_like(o[3]))


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_decoding_cuda_graph(monkeypatch, backend_name):
    monkeypatch.setenv("FLA_BACKEND", backend_name)
    B, HQ, H, D, S = 4, 16, 4, 64, 1281
    q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    valid = torch.rand(B, S, H, device="cuda") < 0.6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lte_decoding_one_step(q, k, v, valid)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = lte_decoding_one_step(q, k, v, valid)
    for _ in range(3):
        q.normal_()
        valid.copy_(torch.rand(B, S, H, device="cuda") < 0.6)
        graph.replay()
        assert_close("o", o, reference64(q, k, v, valid), 1e-2)
