"""lte_attn_triton (Triton kernels, interpreted on the CPU here) against a float64 re-derivation of naive_lte_attn:
forward, dq, dk, dv and d score; odd lengths, GQA groups, windows (0, 1, small, large, > T), selection fractions
0 / ~0.15 / 1, feature dims that are not powers of two, sinks, packed documents. GPU tests at realistic shapes."""

import pytest
import torch

from fla.ops.lte.naive import lte_visible_mask, naive_lte_attn, straight_through_gate
from fla.ops.lte.parallel_kernels import build_selected_index, lte_attn_triton
from fla.ops.lte.selection import sink_mask
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def reference(q, k, v, score, selected, window_size, scale, cu_seqlens=None, dtype=torch.float64):
    """naive_lte_attn's math in ``dtype`` (naive_lte_attn itself computes in float32)."""
    G = q.shape[2] // k.shape[2]
    visible = lte_visible_mask(selected, window_size, cu_seqlens).repeat_interleave(G, dim=1)
    qf, kf = q.to(dtype), k.to(dtype).repeat_interleave(G, dim=2)
    vf = straight_through_gate(v.to(dtype), score.to(dtype)).repeat_interleave(G, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhv->bqhv", p, vf)


def inputs(B, T, HQ, H, D, V, frac, dtype, device, sinks=0, cu_seqlens=None):
    q = torch.randn(B, T, HQ, D, device=device).to(dtype)
    k = torch.randn(B, T, H, D, device=device).to(dtype)
    v = torch.randn(B, T, H, V, device=device).to(dtype)
    score = torch.randn(B, T, H, device=device)
    selected = torch.rand(B, T, H, device=device) < frac
    if sinks:
        selected = selected | sink_mask(B, T, sinks, cu_seqlens, device)[..., None]
    return q, k, v, score, selected


def check(q, k, v, score, selected, window_size, cu_seqlens=None, scale=None, tol=None, ref_dtype=torch.float64):
    tol = TOL[q.dtype] if tol is None else tol
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q1, k1, v1, s1 = (t.detach().clone().requires_grad_(True) for t in (q, k, v, score))
    o = lte_attn_triton(q1, k1, v1, s1, selected, window_size, scale, cu_seqlens)
    assert o.dtype == q.dtype and o.shape == (*q.shape[:3], v.shape[-1])
    do = torch.randn_like(o)
    o.backward(do)
    q2, k2, v2, s2 = (t.detach().to(ref_dtype).requires_grad_(True) for t in (q, k, v, score))
    o_ref = reference(q2, k2, v2, s2, selected, window_size, scale, cu_seqlens, ref_dtype)
    o_ref.backward(do.to(ref_dtype))
    assert s1.grad.dtype == score.dtype
    assert_close("o", o, o_ref, tol)
    # a query that sees only itself has zero dq / dk up to rounding: compare those absolutely
    atol = tol * 10 if window_size == 0 else 0.0
    assert_close("dq", q1.grad, q2.grad, tol, atol=atol)
    assert_close("dk", k1.grad, k2.grad, tol, atol=atol)
    assert_close("dv", v1.grad, v2.grad, tol)
    assert_close("dscore", s1.grad, s2.grad, tol)
    return o


CASES = [  # (B, T, HQ, H, D, V, window, selection fraction, dtype)
    (2, 1, 2, 1, 32, 32, 0, 0.15, torch.float32),
    (2, 37, 4, 2, 32, 32, 7, 0.15, torch.float32),
    (1, 100, 4, 1, 32, 32, 7, 0.15, torch.float32),
    (1, 130, 2, 2, 32, 32, 1, 0.15, torch.float32),
    (1, 100, 2, 1, 32, 32, 0, 0.15, torch.float32),
    (1, 100, 2, 1, 32, 32, 64, 0.15, torch.float32),
    (1, 37, 2, 2, 32, 32, 1000, 0.15, torch.float32),
    (1, 100, 2, 1, 32, 32, 7, 0.0, torch.float32),
    (1, 100, 2, 1, 32, 32, 0, 0.0, torch.float32),
    (1, 100, 2, 1, 32, 32, 7, 1.0, torch.float32),
    (1, 37, 4, 2, 48, 24, 7, 0.15, torch.float32),
    (1, 100, 4, 2, 32, 32, 7, 0.15, torch.bfloat16),
    (2, 37, 3, 1, 32, 32, 5, 0.3, torch.bfloat16),
    (1, 64, 2, 1, 32, 32, 16, 0.15, torch.float16),
    (1, 37, 2, 1, 160, 96, 7, 0.2, torch.float32),  # wide heads, not powers of two
]


@pytest.mark.parametrize("B,T,HQ,H,D,V,window,frac,dtype", CASES,
                         ids=[f"B{c[0]}T{c[1]}HQ{c[2]}H{c[3]}D{c[4]}V{c[5]}-w{c[6]}-f{c[7]}-{str(c[8])[6:]}"
                              for c in CASES])
def test_lte_attn_triton_matches_reference(device, B, T, HQ, H, D, V, window, frac, dtype):
    check(*inputs(B, T, HQ, H, D, V, frac, dtype, device), window_size=window)


def test_lte_attn_triton_sinks_and_scale(device):
    q, k, v, score, selected = inputs(2, 100, 4, 2, 32, 32, 0.05, torch.float32, device, sinks=4)
    check(q, k, v, score, selected, window_size=9, scale=0.3)


@pytest.mark.parametrize("window,cu", [(0, [0, 23, 60, 101]), (7, [0, 23, 60, 101]), (64, [0, 23, 60, 101]),
                                       (7, [0, 0, 33, 33, 99])], ids=["w0", "w7", "w64", "w7-with-empty"])
def test_lte_attn_triton_varlen(device, window, cu):
    cu_seqlens = torch.tensor(cu, device=device, dtype=torch.int32)
    q, k, v, score, selected = inputs(1, cu[-1], 4, 2, 32, 32, 0.15, torch.float32, device, sinks=2,
                                      cu_seqlens=cu_seqlens)
    o = check(q, k, v, score, selected, window, cu_seqlens)
    for s, e in zip(cu[:-1], cu[1:]):  # packed == each document on its own
        if e == s:
            continue
        o_doc = lte_attn_triton(q[:, s:e], k[:, s:e], v[:, s:e], score[:, s:e], selected[:, s:e], window,
                                32 ** -0.5)
        assert_close(f"doc {s}:{e}", o[:, s:e], o_doc, 1e-5)


GPU_TILES = {"square": {"fwd": (64, 64), "dkdv": (64, 64), "dq": (64, 64), "dkdv_sel": (64, 64)},
             "unequal": {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32), "dkdv_sel": (32, 32)}}


@pytest.mark.parametrize("tiles", sorted(GPU_TILES))
@pytest.mark.parametrize("window,cu", [(100, None), (150, [0, 70, 261])], ids=["w100", "w150-varlen"])
def test_lte_attn_triton_gpu_tiles(monkeypatch, device, tiles, window, cu):
    """GPU-sized tiles, interpreted: windows wide enough for interior (unmasked) tiles beside the masked ones."""
    import fla.ops.lte.parallel_kernels as kernels

    monkeypatch.setattr(kernels, "launch_config", lambda stage, DK, DV, fp32=False: (*GPU_TILES[tiles][stage], 4, 1))
    cu_seqlens = None if cu is None else torch.tensor(cu, device=device, dtype=torch.int32)
    q, k, v, score, selected = inputs(1, 261, 2, 1, 32, 32, 0.15, torch.float32, device, sinks=2,
                                      cu_seqlens=cu_seqlens)
    check(q, k, v, score, selected, window, cu_seqlens)


def test_lte_attn_triton_empty(device):
    q, k, v, score, selected = inputs(1, 0, 2, 1, 16, 16, 0.5, torch.float32, device)
    q, k, v, score = (t.requires_grad_(True) for t in (q, k, v, score))
    o = lte_attn_triton(q, k, v, score, selected, 3, 0.25)
    o.sum().backward()
    assert o.shape == (1, 0, 2, 16) and q.grad.shape == q.shape and score.grad.shape == score.shape


def test_reference_is_naive_lte_attn(device):
    """The float64 re-derivation used above is naive_lte_attn's math (checked in float32)."""
    q, k, v, score, selected = inputs(1, 37, 4, 2, 16, 16, 0.2, torch.float32, device, sinks=2)
    a = reference(q, k, v, score, selected, 5, 0.25, dtype=torch.float32)
    b = naive_lte_attn(q, k, v, score, 5, scale=0.25, selected=selected)
    assert_close("o", a, b, 1e-6)


def test_build_selected_index(device):
    sel = torch.rand(2, 50, 3, device=device) < 0.3
    flat, cnt, pos, eos = build_selected_index(sel, None)
    assert eos is None
    for r in range(6):
        b, h = divmod(r, 3)
        where = sel[b, :, h].nonzero().flatten()
        n = where.numel()
        assert int(cnt[r, -1]) == n and torch.equal(pos[r, :n].long(), where)
        assert torch.equal(cnt[r, 1:].long(), sel[b, :, h].long().cumsum(0))
    _, _, _, eos = build_selected_index(sel[:1], torch.tensor([0, 0, 20, 50], device=device))
    assert eos.tolist() == [20] * 20 + [50] * 30


# ----- realistic shapes, on the GPU only -------------------------------------------------------------------------

def _gpu_check(B, T, HQ, H, D, window, frac, dtype, tol):
    q, k, v, score, selected = inputs(B, T, HQ, H, D, D, frac, dtype, "cuda", sinks=4)
    check(q, k, v, score, selected, window, tol=tol, ref_dtype=torch.float32)


@pytest.mark.gpu
def test_lte_attn_triton_gpu_mha():
    _gpu_check(2, 1000, 16, 16, 64, 100, 0.125, torch.bfloat16, 1e-2)


@pytest.mark.gpu
def test_lte_attn_triton_gpu_gqa_long():
    _gpu_check(1, 4096, 32, 8, 64, 768, 0.125, torch.bfloat16, 1e-2)


@pytest.mark.gpu
def test_lte_attn_triton_gpu_fp32():
    q, k, v, score, selected = inputs(1, 1000, 4, 2, 64, 64, 0.125, torch.float32, "cuda", sinks=4)
    check(q, k, v, score, selected, 100, tol=1e-5, ref_dtype=torch.float64)


@pytest.mark.gpu
def test_lte_attn_triton_gpu_varlen():
    cu = [0, 301, 1000, 1777, 2048]
    cu_seqlens = torch.tensor(cu, device="cuda", dtype=torch.int32)
    q, k, v, score, selected = inputs(1, cu[-1], 8, 2, 128, 128, 0.125, torch.bfloat16, "cuda", sinks=4,
                                      cu_seqlens=cu_seqlens)
    check(q, k, v, score, selected, 256, cu_seqlens, tol=1e-2, ref_dtype=torch.float32)
