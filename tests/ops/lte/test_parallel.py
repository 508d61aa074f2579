"""parallel_lte_attn (the public wrapper): both backends against the float64 dense-mask reference, forward and every
gradient including the router score's straight-through gradient; selection overrides; validation."""

import pytest
import torch

from fla.ops.lte import enforce_buffer_size, naive_lte_attn, parallel_lte_attn, select_tokens
from fla.ops.lte.naive import lte_visible_mask, straight_through_gate
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def reference64(q, k, v, score, window_size, sink_size, cu_seqlens=None, selected=None):
    q, k, v, score = (t.double() for t in (q, k, v, score))
    if selected is None:
        selected = select_tokens(score.detach(), sink_size, cu_seqlens)
    G = q.shape[2] // k.shape[2]
    visible = lte_visible_mask(selected, window_size, cu_seqlens).repeat_interleave(G, dim=1)
    v = straight_through_gate(v, score)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(G, dim=2)) * q.shape[-1] ** -0.5
    p = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
    return torch.einsum("bhqk,bkhv->bqhv", p, v.repeat_interleave(G, dim=2))


@pytest.mark.parametrize("B,T,HQ,H,D,w,s,dtype,varlen", [
    (2, 37, 4, 2, 32, 5, 2, torch.float32, False),
    (1, 70, 4, 1, 16, 0, 0, torch.float32, False),
    (1, 64, 2, 2, 32, 100, 1, torch.float32, True),
    (2, 45, 8, 2, 32, 7, 3, torch.bfloat16, False),
])
def test_matches_reference(backend, B, T, HQ, H, D, w, s, dtype, varlen):
    q = torch.randn(B, T, HQ, D).to(dtype)
    k = torch.randn(B, T, H, D).to(dtype)
    v = torch.randn(B, T, H, D).to(dtype)
    score = torch.rand(B, T, H) - 0.8  # about 20% selected
    cu = torch.tensor([0, 20, 21, 64]) if varlen else None
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, score)]
    o = parallel_lte_attn(*leaves, window_size=w, sink_size=s, cu_seqlens=cu)
    do = torch.randn_like(o)
    o.backward(do)
    refs = [t.detach().clone().double().requires_grad_(True) for t in (q, k, v, score)]
    o_ref = reference64(*refs, w, s, cu)
    o_ref.backward(do.double())
    tol = TOL[dtype]
    assert o.dtype == dtype
    assert_close("o", o, o_ref, tol)
    for name, a, b in zip(("dq", "dk", "dv", "dscore"), leaves, refs):
        assert_close(name, a.grad, b.grad, tol)
    naive = naive_lte_attn(q.float(), k.float(), v.float(), score, w, s, cu_seqlens=cu)
    assert_close("naive", naive, o_ref, 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("rows", [1, 16, 64])
@pytest.mark.parametrize("w,s,frac,cu,dtype", [
    (5, 2, 0.2, None, torch.float32), (0, 0, 0.3, None, torch.float32), (20, 1, 0.05, None, torch.float32),
    (3, 0, 0.0, None, torch.float32), (99, 1, 0.2, None, torch.float32), (7, 2, 0.2, [0, 45, 46, 100], torch.float32),
    (9, 1, 0.2, None, torch.bfloat16)])
def test_torch_path_query_blocks(rows, w, s, frac, cu, dtype):
    """The torch path in blocks of query rows (window keys plus the gathered selected keys before them) against the
    float64 dense-mask reference: forward and every gradient, GQA, selections that differ per head, blocks edges
    inside a window, packed sequences."""
    from fla.ops.lte.parallel import parallel_lte_attn_torch

    B, T, HQ, H, D, V = (2 if cu is None else 1), 100, 4, 2, 16, 24
    q, k, v = torch.randn(B, T, HQ, D).to(dtype), torch.randn(B, T, H, D).to(dtype), torch.randn(B, T, H, V).to(dtype)
    score = torch.rand(B, T, H) - (1 - frac)
    cu = None if cu is None else torch.tensor(cu)
    selected = select_tokens(score, s, cu)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, score)]
    o = parallel_lte_attn_torch(*leaves, selected, w, D ** -0.5, cu, query_block=rows)
    do = torch.randn_like(o)
    o.backward(do)
    refs = [t.detach().clone().double().requires_grad_(True) for t in (q, k, v, score)]
    o_ref = reference64(*refs, w, s, cu, selected=selected)
    o_ref.backward(do.double())
    assert o.dtype == dtype
    assert_close("o", o, o_ref, TOL[dtype])
    for name, a, b in zip(("dq", "dk", "dv", "dscore"), leaves, refs):
        assert_close(name, a.grad, b.grad, TOL[dtype])


def test_selected_override_and_eval_cap(backend):
    q, k, v = torch.randn(1, 50, 2, 16), torch.randn(1, 50, 2, 16), torch.randn(1, 50, 2, 16)
    score = torch.randn(1, 50, 2)
    sel = enforce_buffer_size(score, select_tokens(score, 2), buffer_size=4, window_size=6, sink_size=2)
    o = parallel_lte_attn(q, k, v, score, 6, 2, selected=sel)
    assert_close("capped", o, reference64(q, k, v, score, 6, 2, selected=sel), 1e-5)
    assert int(sel[0, :43].sum(0).max()) <= 4


def test_window_covers_everything_is_causal_attention(backend):
    from fla.ops.attn import naive_attn

    q, k, v = torch.randn(2, 30, 4, 16), torch.randn(2, 30, 2, 16), torch.randn(2, 30, 2, 16)
    o = parallel_lte_attn(q, k, v, torch.full((2, 30, 2), -1.0), window_size=29)
    assert_close("full", o, naive_attn(q, k, v), 1e-5)


def test_bad_inputs():
    q, k, v, s = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2)
    with pytest.raises(ValueError, match="window_size"):
        parallel_lte_attn(q, k, v, s, window_size=-1)
    with pytest.raises(ValueError, match="score"):
        parallel_lte_attn(q, k, v, s[:, :, :1], window_size=3)
    with pytest.raises(ValueError, match="HQ"):
        parallel_lte_attn(torch.randn(1, 8, 3, 16), k, v, s, window_size=3)
    with pytest.raises(ValueError, match="selected"):
        parallel_lte_attn(q, k, v, s, window_size=3, selected=(s > 0).float())
