"""parallel_nsa's Triton path (selected-block attention kernels; window branch through parallel_attn's kernels):
forward and gradients against the reference under the CPU interpreter at tiny shapes, and against the torch path
on the GPU at realistic shapes (gpu marker)."""

import pytest
import torch

from fla.ops.nsa import naive_nsa, parallel_nsa
from fla.ops.nsa.parallel_kernels import clean_block_indices, selected_attention
from fla.utils.testing import assert_close

NAMES = ["q", "k", "v", "g_cmp", "g_slc", "g_swa"]


def inputs(B, Tq, Tk, HQ, H, D, device="cpu", dtype=torch.float32):
    ts = [torch.randn(B, Tq, HQ, D), torch.randn(B, Tk, H, D), torch.randn(B, Tk, H, D)]
    ts += [torch.rand(B, Tq, HQ) for _ in range(3)]
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in ts]


def grads(o, ts, do):
    return torch.autograd.grad(o, ts, do)


@pytest.mark.parametrize("B, Tq, Tk, HQ, H, D, BS, S, W, cu", [
    (2, 37, 37, 4, 2, 8, 8, 3, 10, None),     # odd T, not a multiple of the block
    (1, 40, 40, 6, 2, 16, 16, 2, 0, None),    # group of 3, no window
    (2, 9, 50, 4, 1, 8, 8, 4, 12, None),      # fewer queries than keys
    (1, 45, 45, 4, 2, 8, 8, 3, 7, [0, 13, 45]),
    (1, 30, 110, 2, 1, 8, 4, 5, 9, None),     # several block tiles in the compression kernels
])
def test_triton_path_matches_reference(monkeypatch, B, Tq, Tk, HQ, H, D, BS, S, W, cu):
    monkeypatch.setenv("FLA_BACKEND", "triton")
    ts = inputs(B, Tq, Tk, HQ, H, D)
    if not W:
        ts[5] = None
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    kw = dict(block_counts=S, block_size=BS, window_size=W, cu_seqlens=cu_seqlens)
    ref, ref_idx = naive_nsa(*ts, return_block_indices=True, **kw)
    out, idx = parallel_nsa(*ts, return_block_indices=True, **kw)
    assert torch.equal(idx, ref_idx), "selected blocks differ"
    assert_close("o", out, ref, 1e-5)
    do = torch.randn_like(ref)
    live = [t for t in ts if t is not None]
    for name, a, b in zip([n for n, t in zip(NAMES, ts) if t is not None], grads(out, live, do),
                          grads(ref, live, do)):
        assert_close(f"d{name}", a, b, 1e-5)


@pytest.mark.parametrize("off", [("g_cmp",), ("g_swa",), ("g_cmp", "g_swa"), ("g_slc",), ("given_blocks",)])
def test_triton_path_branch_subsets(monkeypatch, off):
    """Each branch left out of the gated sum in turn (the fused function with and without the compressed / window
    outputs; without the selected branch the generic path), and block indices given instead of selected."""
    monkeypatch.setenv("FLA_BACKEND", "triton")
    B, T, HQ, H, D, BS, S, W = 1, 29, 6, 2, 8, 4, 3, 6
    ts = inputs(B, T, T, HQ, H, D)
    for name in off:
        if name in NAMES:
            ts[NAMES.index(name)] = None
    kw = dict(block_counts=S, block_size=BS, window_size=W if ts[5] is not None else 0)
    if "given_blocks" in off:
        kw["block_indices"] = torch.randint(-1, (T + BS - 1) // BS, (B, T, H, S))
    ref = naive_nsa(*ts, **kw)
    out = parallel_nsa(*ts, **kw)
    assert_close("o", out, ref, 1e-5)
    do = torch.randn_like(ref)
    live = [t for t in ts if t is not None]
    names = [n for n, t in zip(NAMES, ts) if t is not None]
    for name, a, b in zip(names, grads(out, live, do), grads(ref, live, do)):
        assert_close(f"d{name}", a, b, 1e-5)


def test_selected_attention_kernel_with_repeated_and_invalid_blocks():
    q, k, v = [t.detach().requires_grad_() for t in inputs(1, 30, 30, 2, 1, 8)[:3]]
    idx = torch.randint(-1, 5, (1, 30, 1, 4))
    idx[..., 0] = torch.arange(30)[None, :, None] // 8
    idx[..., 1] = idx[..., 0]  # a repeat counts once
    g = torch.ones(1, 30, 2)
    ref = naive_nsa(q, k, v, None, g, None, block_counts=4, block_size=8, window_size=0, block_indices=idx)
    out = selected_attention(q, k, v, idx, 8, 8 ** -0.5)
    assert_close("o", out, ref, 1e-5)
    do = torch.randn_like(out)
    for name, a, b in zip("qkv", grads(out, [q, k, v], do), grads(ref, [q, k, v], do)):
        assert_close(f"d{name}", a, b, 1e-5)
    cleaned = clean_block_indices(idx, 30, 8)
    assert cleaned.dtype == torch.int32
    assert ((cleaned[..., 1:] != cleaned[..., :-1]) | (cleaned[..., 1:] < 0)).all()


# ---------------------------------------------------------------------------------------------------------------
# GPU: the kernels against the torch path at realistic shapes (the torch path is proven against the reference)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B, Tq, Tk, HQ, H, D, cu", [
    (2, 2048, 2048, 32, 2, 64, None),
    (1, 1000, 1000, 32, 2, 64, None),
    (2, 300, 2048, 32, 2, 64, None),
    (1, 2500, 2500, 32, 2, 64, [0, 700, 777, 2500]),
    (1, 1024, 1024, 16, 4, 128, None),
])
def test_parallel_nsa_gpu(monkeypatch, B, Tq, Tk, HQ, H, D, cu, dtype):
    ts = inputs(B, Tq, Tk, HQ, H, D, device="cuda", dtype=dtype)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    kw = dict(block_counts=16, block_size=64, window_size=512, cu_seqlens=cu_seqlens)
    monkeypatch.setenv("FLA_BACKEND", "torch")
    ref_ts = [t.detach().float().requires_grad_() for t in ts]
    ref, idx = parallel_nsa(*ref_ts, return_block_indices=True, **kw)
    monkeypatch.setenv("FLA_BACKEND", "triton")
    out = parallel_nsa(*ts, block_indices=idx, **kw)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert_close("o", out.float(), ref, tol)
    do = torch.randn_like(ref)
    for name, a, b in zip(NAMES, grads(out, ts, do.to(dtype)), grads(ref, ref_ts, do)):
        assert_close(f"d{name}", a.float(), b, 2 * tol)


@pytest.mark.gpu
@pytest.mark.parametrize("B, Tq, Tk", [(2, 2048, 2048), (1, 257, 3000)])
def test_block_selection_gpu(monkeypatch, B, Tq, Tk):
    """The Triton ranking picks the torch path's blocks (fp32; a rare near-tie may swap one block)."""
    ts = [t.detach() for t in inputs(B, Tq, Tk, 32, 2, 64, device="cuda")]
    kw = dict(block_counts=16, block_size=64, window_size=512, return_block_indices=True)
    monkeypatch.setenv("FLA_BACKEND", "torch")
    _, ref = parallel_nsa(*ts, **kw)
    monkeypatch.setenv("FLA_BACKEND", "triton")
    _, idx = parallel_nsa(*ts, **kw)
    assert idx.shape == ref.shape
    assert (idx == ref).all(-1).float().mean().item() > 0.999
