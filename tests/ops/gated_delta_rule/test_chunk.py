"""Chunked gated delta rule, Triton path, against a float64 token-by-token reference: forward, final state and the
gradients of q, k, v, g, beta and the initial state.

On a machine without CUDA the kernels run in the Triton interpreter (tests/conftest.py) at tiny shapes; the
``gpu``-marked tests run realistic shapes on a CUDA device (skipped here):

    python -m pytest tests/ops/gated_delta_rule/test_chunk.py -m gpu -v
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fla.ops.gated_delta_rule import chunk_gated_delta_rule
from fla.ops.gated_delta_rule.chunk_torch import chunk_gated_delta_rule_torch
from fla.ops.utils.cumsum import chunk_local_cumsum, chunk_local_cumsum_torch
from fla.ops.utils.solve_tril import solve_tril
from fla.utils.testing import assert_close

INTERPRET_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
GPU_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
DG_FACTOR = 2  # dg sums differences of q.dq and k.dk: a little more rounding than the other gradients


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FLA_BACKEND", "triton")


def reference(q, k, v, g, beta, scale, initial_state=None, cu_seqlens=None, l2norm=False):
    """Token-by-token recurrence in float64 (differentiable): returns (o, final_state)."""
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    if l2norm:
        q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    B, T, H, K = q.shape
    V = v.shape[-1]
    spans = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, s, e) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    o = torch.zeros(B, T, H, V, dtype=torch.float64, device=q.device)
    finals = []
    for n, (b, s, e) in enumerate(spans):
        state = initial_state[n].double() if initial_state is not None else \
            torch.zeros(H, K, V, dtype=torch.float64, device=q.device)
        rows = []
        for t in range(s, e):
            state = state * g[b, t].exp()[:, None, None]
            u = beta[b, t][:, None] * (v[b, t] - torch.einsum("hkv,hk->hv", state, k[b, t]))
            state = state + torch.einsum("hk,hv->hkv", k[b, t], u)
            rows.append(scale * torch.einsum("hkv,hk->hv", state, q[b, t]))
        if rows:
            o = o.index_put((torch.tensor(b, device=q.device), torch.arange(s, e, device=q.device)),
                            torch.stack(rows))
        finals.append(state)
    return o, torch.stack(finals)


def make_inputs(B, T, H, K, V, dtype, device, N=None, use_h0=True, l2norm=False):
    """Inputs of a stable recurrence: unit-norm keys (raw ones when the op normalises), beta in (0, 1), decays
    exp(g) in about (0.3, 1)."""
    N = B if N is None else N
    q = torch.randn(B, T, H, K, device=device)
    k = torch.randn(B, T, H, K, device=device)
    if not l2norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, device=device)
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + 2.0)
    beta = torch.rand(B, T, H, device=device)
    h0 = torch.randn(N, H, K, V, device=device) if use_h0 else None
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype), h0


def chunked_reference(q, k, v, g, beta, scale, initial_state=None, cu_seqlens=None, l2norm=False):
    """The chunked torch path in float64 (itself checked against ``reference`` on CPU): fast enough for the GPU
    tests' long sequences, where the token-by-token float64 autograd graph took most of the run."""
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    if l2norm:
        q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    h0 = initial_state.double() if initial_state is not None else None
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, h0, True, cu_seqlens)


def run_and_compare(q, k, v, g, beta, h0, scale, cu_seqlens, l2norm, tol, dg_tol=None, final_state_grad=True,
                    reference_fn=None):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta)]
    h0_leaf = h0.clone().requires_grad_(True) if h0 is not None else None
    o, ht = chunk_gated_delta_rule(*leaves, scale=scale, initial_state=h0_leaf, output_final_state=True,
                                   use_qk_l2norm_in_kernel=l2norm, cu_seqlens=cu_seqlens)
    assert o.dtype == v.dtype and ht.dtype == torch.float32
    do = torch.randn_like(o)
    dht = torch.randn_like(ht) if final_state_grad else None
    torch.autograd.backward([o] + ([ht] if final_state_grad else []), [do] + ([dht] if final_state_grad else []))

    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, g, beta)]
    ref_h0 = h0.detach().double().requires_grad_(True) if h0 is not None else None
    o_ref, ht_ref = (reference_fn or reference)(*ref_leaves, scale, ref_h0, cu_seqlens, l2norm)
    torch.autograd.backward([o_ref] + ([ht_ref] if final_state_grad else []),
                            [do.double()] + ([dht.double()] if final_state_grad else []))

    assert_close("o", o, o_ref, tol)
    assert_close("final_state", ht, ht_ref, tol)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), leaves, ref_leaves):
        assert a.grad.dtype == a.dtype, name
        assert_close(name, a.grad, b.grad, dg_tol if (name == "dg" and dg_tol) else tol)
    if h0 is not None:
        assert_close("dh0", h0_leaf.grad, ref_h0.grad, tol)


CASES = [  # (B, T, H, K, V, dtype, initial state, l2norm)
    (1, 1, 2, 16, 16, torch.float32, True, False),
    (2, 37, 2, 32, 16, torch.float32, True, False),
    (1, 64, 2, 16, 32, torch.float32, False, False),
    (2, 100, 2, 32, 32, torch.float32, True, True),
    (1, 128, 1, 16, 16, torch.float32, True, False),
    (1, 70, 1, 80, 72, torch.float32, True, True),  # several K / V slabs, dims that are not powers of 2
    (1, 100, 2, 32, 32, torch.bfloat16, True, False),
    (2, 70, 2, 16, 16, torch.bfloat16, False, True),
    (1, 100, 2, 32, 16, torch.float16, True, False),
]


@pytest.mark.parametrize("B,T,H,K,V,dtype,use_h0,l2norm", CASES,
                         ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-K{c[3]}-V{c[4]}-{str(c[5])[6:]}-h0{int(c[6])}-l2{int(c[7])}"
                              for c in CASES])
def test_chunk_matches_reference(triton_backend, device, B, T, H, K, V, dtype, use_h0, l2norm):
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, dtype, device, use_h0=use_h0, l2norm=l2norm)
    tol = INTERPRET_TOL[dtype] if device == "cpu" else GPU_TOL[dtype]
    run_and_compare(q, k, v, g, beta, h0, K ** -0.5, None, l2norm, tol, DG_FACTOR * tol)


@pytest.mark.parametrize("cu", [[0, 17, 69, 100], [0, 64, 64, 65, 130]], ids=["17-52-31", "64-0-1-65"])
def test_chunk_varlen_matches_reference(triton_backend, device, cu):
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    T, N = cu[-1], len(cu) - 1
    q, k, v, g, beta, h0 = make_inputs(1, T, 2, 16, 16, torch.float32, device, N=N)
    tol = INTERPRET_TOL[torch.float32] if device == "cpu" else GPU_TOL[torch.float32]
    run_and_compare(q, k, v, g, beta, h0, 0.5, cu_seqlens, False, tol, DG_FACTOR * tol)


def test_chunk_varlen_equals_separate_sequences(triton_backend, device):
    cu = [0, 17, 69, 100]
    cu_seqlens = torch.tensor(cu, dtype=torch.long, device=device)
    q, k, v, g, beta, h0 = make_inputs(1, cu[-1], 2, 32, 16, torch.bfloat16, device, N=3, l2norm=True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta, h0)]
    o, ht = chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True,
                                   use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    torch.autograd.backward([o, ht], [do, dht])
    for n, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        parts = [t[:, s:e].clone().requires_grad_(True) for t in (q, k, v, g, beta)]
        h0_n = h0[n:n + 1].clone().requires_grad_(True)
        o_n, ht_n = chunk_gated_delta_rule(*parts, initial_state=h0_n, output_final_state=True,
                                           use_qk_l2norm_in_kernel=True)
        torch.autograd.backward([o_n, ht_n], [do[:, s:e], dht[n:n + 1]])
        # same per-chunk arithmetic; the varlen kernels are compiled separately, so allow a bf16 rounding flip
        tol = 2e-3
        assert_close(f"o[{n}]", o[:, s:e], o_n, tol)
        assert_close(f"ht[{n}]", ht[n:n + 1], ht_n, tol)
        for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), leaves, parts):
            assert_close(f"{name}[{n}]", a.grad[:, s:e], b.grad, tol)
        assert_close(f"dh0[{n}]", leaves[5].grad[n:n + 1], h0_n.grad, tol)


def test_chunk_strong_decay_and_negative_eigenvalues(triton_backend, device):
    """Decays down to exp(-8) per token (cumulative exponents far below float32's range inside a chunk) and beta in
    (0, 2) (``allow_neg_eigval``): nothing may overflow or turn into NaN."""
    q, k, v, _, _, h0 = make_inputs(2, 90, 2, 16, 16, torch.float32, device)
    g = -8 * torch.rand(2, 90, 2, device=device)
    g[:, :10] = 0.0  # and no decay at all at the start
    beta = 2 * torch.rand(2, 90, 2, device=device)
    run_and_compare(q, k, v, g, beta, h0, 0.25, None, False, 1e-5, 2e-5)


def test_chunk_without_final_state_gradient(triton_backend, device):
    q, k, v, g, beta, h0 = make_inputs(1, 50, 1, 16, 16, torch.float32, device)
    run_and_compare(q, k, v, g, beta, h0, 1.0, None, False, 1e-5, 2e-5, final_state_grad=False)


def test_chunk_optional_outputs_and_dtypes(triton_backend, device):
    q, k, v, g, beta, _ = make_inputs(1, 20, 1, 16, 16, torch.float32, device, use_h0=False)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta)
    assert ht is None and o.shape == v.shape
    # g and beta of other dtypes, state of another dtype: gradients come back in the inputs' dtypes
    g16 = g.to(torch.bfloat16).requires_grad_(True)
    b16 = beta.to(torch.float16).requires_grad_(True)
    h0 = torch.randn(1, 1, 16, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    o, ht = chunk_gated_delta_rule(q, k, v, g16, b16, initial_state=h0, output_final_state=True)
    (o.sum() + ht.sum()).backward()
    assert g16.grad.dtype == torch.bfloat16 and b16.grad.dtype == torch.float16 and h0.grad.dtype == torch.bfloat16
    o_ref, ht_ref = reference(q, k, v, g16, b16, 16 ** -0.5, h0)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("ht", ht, ht_ref, 1e-5)


def test_chunk_rejects_large_key_dim(triton_backend, device):
    q = torch.randn(1, 4, 1, 272, device=device)
    v = torch.randn(1, 4, 1, 16, device=device)
    g, beta = torch.zeros(1, 4, 1, device=device), torch.ones(1, 4, 1, device=device)
    with pytest.raises(ValueError, match="K <= 256"):
        chunk_gated_delta_rule(q, q, v, g, beta)


@pytest.mark.parametrize("T,segments,use_h0", [(200, 3, True), (150, 3, False), (256, 4, True)],
                         ids=["T200-S2-h0", "T150-S3", "T256-S4-h0"])
def test_state_recurrence_in_segments_equals_one_walk(device, T, segments, use_h0):
    """``chunk_fwd_h`` and ``chunk_bwd_dhu`` cut into segments (start states from the segments' transition
    products) give the chunk states, pseudo-values and final state (gradients) of the one in-order walk."""
    from fla.ops.gated_delta_rule import chunk_h, wy_fwd
    from fla.ops.gated_delta_rule.chunk_common import make_chunking

    q, k, v, g, beta, h0 = make_inputs(2, T, 2, 32, 16, torch.float32, device, use_h0=use_h0)
    # weak decay and small beta: a segment's transition product stays far from 0, so a wrong start state shows
    g, beta = -0.01 * torch.rand_like(g), 0.2 * beta
    c = make_chunking(2, T, None)
    g = chunk_local_cumsum(g, c.chunk_size)
    w, u = wy_fwd.recompute_w_u(k, v, g, beta, wy_fwd.chunk_scaled_dot_kkt_solve(k, g, beta, c), c)
    one = chunk_h.chunk_fwd_h(k, w, u, g, h0, True, c, segments=1)
    cut = chunk_h.chunk_fwd_h(k, w, u, g, h0, True, c, segments=segments)
    for name, a, b in zip(("h", "v_new", "final_state"), cut, one):
        assert_close(name, a, b, 1e-5)
    # the reverse walk of the backward, cut the same way
    do, dv_local, dht = torch.randn_like(v), torch.randn_like(v), torch.randn_like(one[2])
    one = chunk_h.chunk_bwd_dhu(q, k, w, g, do, dv_local, dht, True, 0.3, c, segments=1)
    cut = chunk_h.chunk_bwd_dhu(q, k, w, g, do, dv_local, dht, True, 0.3, c, segments=segments)
    for name, a, b in zip(("dh", "dv_new", "dh0"), cut, one):
        assert_close(name, a, b, 1e-5)


def test_chunk_with_segmented_states_matches_reference(triton_backend, device, monkeypatch):
    """The whole op (forward and every gradient) when the state recurrence runs in segments, as it does on a GPU for
    long sequences with few heads (``num_segments``): forced here at a size the interpreter runs."""
    from fla.ops.gated_delta_rule import chunk_h

    monkeypatch.setattr(chunk_h, "num_segments", lambda *args: 3)
    q, k, v, g, beta, h0 = make_inputs(1, 230, 2, 32, 16, torch.float32, device)
    g, beta = -0.01 * torch.rand_like(g), 0.2 * beta
    assert chunk_h._segments(None, 2, 230, chunk_h.Chunking(1, 230, 1, 4, 64, None, None, None)) == 3
    run_and_compare(q, k, v, g, beta, h0, 32 ** -0.5, None, False, 1e-5, 2e-5)


def test_num_segments():
    from fla.ops.gated_delta_rule.chunk_h import num_segments

    assert num_segments(8, 512, False) == 8         # B1 H8 T32768: 8 chains of 64 chunks instead of 8 of 512
    assert num_segments(64, 64, False) == 1         # B8 H8 T4096: enough chains already
    assert num_segments(32, 64, False) == 1         # B4 H8 T4096: 2 segments would not shorten the walk
    assert num_segments(8, 512, True) == 1          # packed sequences are walked whole
    assert num_segments(1, 40, False) == 1          # too few chunks per segment


# --------------------------------------------------------------------------- building blocks (fast to localise a bug)

@pytest.mark.parametrize("reverse", [False, True])
def test_chunk_local_cumsum(device, reverse):
    x = torch.randn(2, 100, 3, device=device)
    assert_close("cumsum", chunk_local_cumsum(x, 64, reverse=reverse), chunk_local_cumsum_torch(x, 64, reverse), 1e-6)
    cu = torch.tensor([0, 17, 17, 90, 100], device=device)
    assert_close("cumsum varlen", chunk_local_cumsum(x[:1], 64, reverse=reverse, cu_seqlens=cu),
                 chunk_local_cumsum_torch(x[:1], 64, reverse, cu), 1e-6)


def test_solve_tril(device):
    A = 0.3 * torch.randn(1, 100, 2, 64, device=device)
    cu = torch.tensor([0, 40, 100], device=device)
    X = solve_tril(A, cu_seqlens=cu)
    for s, e in ((0, 40), (40, 100)):
        for c in range(s, e, 64):
            n = min(64, e - c)
            for h in range(2):
                a = A[0, c:c + n, h, :n].double().tril(-1)
                ref = torch.linalg.inv(torch.eye(n, dtype=torch.float64, device=device) + a)
                assert_close("inverse", X[0, c:c + n, h, :n], ref, 1e-5)
                assert (X[0, c:c + n, h, n:] == 0).all()


# --------------------------------------------------------------------------- realistic shapes on the GPU

GPU_CASES = [  # (B, T, H, K, V, dtype, l2norm)
    (2, 1000, 4, 128, 128, torch.bfloat16, True),
    (2, 1000, 4, 128, 128, torch.float32, True),
    (2, 1000, 4, 64, 64, torch.bfloat16, False),
    (2, 1000, 4, 256, 256, torch.bfloat16, True),
    (2, 1000, 4, 256, 256, torch.float32, False),
    (1, 1000, 4, 128, 64, torch.float16, True),
    (2, 500, 4, 100, 60, torch.bfloat16, True),
    # 64 (sequence, head) states: the state kernels take their wide-slab (BV = 64) configuration
    (4, 512, 16, 128, 128, torch.bfloat16, True),
    # 2 states, 128 chunks: both state recurrences run in 8 segments (num_segments)
    (1, 8192, 2, 128, 128, torch.bfloat16, True),
    (1, 8000, 2, 64, 64, torch.float32, False),
    (4, 300, 16, 64, 128, torch.float32, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,K,V,dtype,l2norm", GPU_CASES, ids=[
    f"B{c[0]}-T{c[1]}-H{c[2]}-K{c[3]}-V{c[4]}-{str(c[5])[6:]}-l2{int(c[6])}" for c in GPU_CASES])
def test_chunk_gpu(triton_backend, B, T, H, K, V, dtype, l2norm):
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, dtype, "cuda", l2norm=l2norm)
    tol = GPU_TOL[dtype]
    run_and_compare(q, k, v, g, beta, h0, K ** -0.5, None, l2norm, tol, DG_FACTOR * tol,
                    reference_fn=chunked_reference)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_chunk_gpu_varlen(triton_backend, dtype):
    cu = [0, 1, 63, 64, 64, 300, 301, 1000, 1500]  # lengths 1, 62, 1, 0, 236, 1, 699, 500
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device="cuda")
    q, k, v, g, beta, h0 = make_inputs(1, cu[-1], 4, 128, 128, dtype, "cuda", N=len(cu) - 1, l2norm=True)
    tol = GPU_TOL[dtype]
    run_and_compare(q, k, v, g, beta, h0, 128 ** -0.5, cu_seqlens, True, tol, DG_FACTOR * tol,
                    reference_fn=chunked_reference)
