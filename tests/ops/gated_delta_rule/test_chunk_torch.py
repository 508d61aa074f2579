"""chunk_gated_delta_rule_torch (the chunked CPU path) against a float64 token-by-token reference: outputs, final
states and the gradients of q, k, v, g, beta and the initial state; odd lengths, packed sequences, extreme decays."""

import pytest
import torch
import torch.nn.functional as F

from fla.ops.gated_delta_rule.chunk_torch import chunk_gated_delta_rule_torch
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from fla.utils.testing import assert_close


def reference(q, k, v, g, beta, scale, h0, cu_seqlens):
    """Float64 token loop: S <- exp(g) S; u = beta (v - S^T k); S <- S + k u^T; o = scale S^T q. Returns (o, final)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    spans = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, s, e) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    outs, finals = [], []
    for n, (b, s, e) in enumerate(spans):
        S = h0[n].double() if h0 is not None else torch.zeros(H, K, V, dtype=torch.float64)
        for t in range(s, e):
            S = S * g[b, t].exp()[:, None, None]
            u = beta[b, t][:, None] * (v[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t]))
            S = S + k[b, t][:, :, None] * u[:, None, :]
            outs.append(((b, t), scale * torch.einsum("hkv,hk->hv", S, q[b, t])))
        finals.append(S)
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    o = o.index_put((torch.tensor([bt[0] for bt, _ in outs]), torch.tensor([bt[1] for bt, _ in outs])),
                    torch.stack([x for _, x in outs])) if outs else o
    return o, torch.stack(finals)


def make_inputs(B, T, H, K, V, N=None, dtype=torch.float32, g_kind="normal", with_h0=True):
    q = torch.randn(B, T, H, K, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    if g_kind == "normal":
        g = F.logsigmoid(torch.randn(B, T, H, dtype=torch.float64) + 1.0)
    elif g_kind == "zero":
        g = torch.zeros(B, T, H, dtype=torch.float64)
    else:  # mix of no decay and decays that wipe the state (exp(-1000) = 0 in float32 and float64)
        g = torch.where(torch.rand(B, T, H) < 0.3, -1000.0, 0.0).double() - 30 * torch.rand(B, T, H).double() * \
            (torch.rand(B, T, H) < 0.3)
    beta = torch.rand(B, T, H, dtype=torch.float64).to(dtype)
    h0 = torch.randn(N or B, H, K, V, dtype=dtype) if with_h0 else None
    return q, k, v, g.to(dtype), beta, h0


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def check_against_reference(inputs, cu_seqlens=None, scale=None, tol=1e-5):
    q, k, v, g, beta, h0 = inputs
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ours = leaves(*inputs)
    o, final = chunk_gated_delta_rule_torch(*ours[:5], scale, ours[5], True, cu_seqlens)
    do, dfinal = torch.randn_like(o), torch.randn_like(final)
    ((o * do).sum() + (final * dfinal).sum()).backward()

    refs = leaves(*(x.double() if x is not None else None for x in inputs))
    o_ref, final_ref = reference(*refs[:5], scale, refs[5], cu_seqlens)
    ((o_ref * do.double()).sum() + (final_ref * dfinal.double()).sum()).backward()

    assert o.dtype == v.dtype
    assert_close("o", o, o_ref, tol)
    assert_close("final_state", final, final_ref, tol)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), ours, refs):
        if a is not None:
            assert a.grad.dtype == a.dtype
            assert_close(name, a.grad, b.grad, tol)


def case_id(c):
    return f"B{c[0]}T{c[1]}H{c[2]}K{c[3]}V{c[4]}-h0{int(c[5])}"


CASES = [  # B, T, H, K, V, with_h0
    (2, 1, 2, 16, 16, True),
    (1, 63, 3, 16, 32, False),
    (2, 64, 1, 32, 32, True),
    (1, 65, 2, 32, 16, True),
    (2, 130, 2, 16, 16, True),
    (1, 130, 3, 32, 32, False),
]


@pytest.mark.parametrize("B,T,H,K,V,with_h0", CASES, ids=[case_id(c) for c in CASES])
def test_matches_reference(B, T, H, K, V, with_h0):
    check_against_reference(make_inputs(B, T, H, K, V, with_h0=with_h0))


@pytest.mark.parametrize("T", [65, 130])
def test_float64_inputs_are_exact(T):
    check_against_reference(make_inputs(2, T, 2, 16, 32, dtype=torch.float64), tol=1e-11)


@pytest.mark.parametrize("g_kind", ["zero", "extreme"])
def test_extreme_decays(g_kind):
    check_against_reference(make_inputs(2, 130, 2, 16, 16, g_kind=g_kind), scale=0.7)


def test_packed_sequences_match_reference_and_separate_runs():
    cu_seqlens = torch.tensor([0, 1, 66, 66, 71, 200, 201])  # includes an empty sequence and length-1 sequences
    N, T = cu_seqlens.numel() - 1, int(cu_seqlens[-1])
    inputs = make_inputs(1, T, 2, 16, 32, N=N)
    check_against_reference(inputs, cu_seqlens)

    q, k, v, g, beta, h0 = inputs
    o, final = chunk_gated_delta_rule_torch(q, k, v, g, beta, None, h0, True, cu_seqlens)
    for n in range(N):
        s, e = int(cu_seqlens[n]), int(cu_seqlens[n + 1])
        o_n, final_n = chunk_gated_delta_rule_torch(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], None,
                                                    h0[n:n + 1], True)
        assert_close(f"o[{n}]", o[:, s:e], o_n, 1e-5)
        assert_close(f"final[{n}]", final[n:n + 1], final_n, 1e-5)
    assert torch.equal(final[2], h0[2].float())  # the empty sequence keeps its initial state


def test_packed_without_initial_state():
    cu_seqlens = torch.tensor([0, 100, 101, 150], dtype=torch.int32)
    check_against_reference(make_inputs(1, 150, 2, 16, 16, N=3, with_h0=False), cu_seqlens)


def test_bfloat16_inputs_and_no_final_state():
    q, k, v, g, beta, h0 = make_inputs(2, 70, 2, 32, 32)
    args = [x.bfloat16() for x in (q, k, v)] + [g, beta.bfloat16()]
    o, final = chunk_gated_delta_rule_torch(*args, None, h0, False)
    assert final is None and o.dtype == torch.bfloat16
    o_ref, _ = reference(*args, 32 ** -0.5, h0, None)
    assert_close("o", o, o_ref, 1e-2)


def test_agrees_with_the_package_reference():
    q, k, v, g, beta, h0 = make_inputs(2, 100, 2, 16, 16)
    o, final = chunk_gated_delta_rule_torch(q, k, v, g, beta, 0.5, h0, True)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, 0.5, h0, True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)
