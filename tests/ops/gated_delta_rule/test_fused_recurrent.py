"""fused_recurrent_gated_delta_rule, both backends (Triton interpreted on CPU), against the float32 token-by-token
reference: prefill, step-by-step decoding, batched decoding of packed length-1 sequences, L2 normalisation, half
precision, gradient routing to the torch path, argument errors."""

import pytest
import torch
import torch.nn.functional as F

from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the Triton forward (so a test can tell which path ran)."""
    import fla.ops.gated_delta_rule.fused_recurrent_kernels as kernels

    calls = []
    original = kernels.fused_recurrent_gdn_fwd

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "fused_recurrent_gdn_fwd", spy)
    return calls


def make_inputs(B, T, H, K, V, N=None, dtype=torch.float32, device="cpu", normalise_k=True, with_h0=True):
    q = torch.randn(B, T, H, K, device=device)
    k = torch.randn(B, T, H, K, device=device)
    k = F.normalize(k, dim=-1) if normalise_k else k
    v = torch.randn(B, T, H, V, device=device)
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + 1.0)
    beta = torch.rand(B, T, H, device=device)
    h0 = torch.randn(N or B, H, K, V, device=device) if with_h0 else None
    return [x.to(dtype) for x in (q, k, v)] + [g, beta.to(dtype), h0]


def case_id(c):
    return f"B{c[0]}T{c[1]}H{c[2]}K{c[3]}V{c[4]}-h0{int(c[5])}"


PREFILL = [  # B, T, H, K, V, with_h0
    (2, 1, 2, 16, 16, True),
    (1, 5, 3, 32, 16, False),
    (2, 20, 2, 16, 32, True),
    (1, 13, 1, 64, 64, True),
    (1, 4, 1, 128, 96, True),  # several value blocks, V not a power of 2
    (1, 2, 2, 256, 40, False),
]


@pytest.mark.parametrize("B,T,H,K,V,with_h0", PREFILL, ids=[case_id(c) for c in PREFILL])
def test_prefill_matches_reference(backend, device, kernel_calls, B, T, H, K, V, with_h0):
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, device=device, with_h0=with_h0)
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert len(kernel_calls) == (1 if backend == "triton" else 0)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)
    o2, none = fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0)
    assert none is None
    assert_close("o(scale=0.3)", o2, o_ref * (0.3 * K ** 0.5), 1e-5)


def test_step_by_step_decoding_equals_one_pass(backend, device):
    B, T, H, K, V = 2, 12, 2, 32, 16
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, device=device)
    o_full, final_full = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    state, outs = h0, []
    for t in range(T):
        o_t, state = fused_recurrent_gated_delta_rule(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1],
                                                      beta[:, t:t + 1], initial_state=state, output_final_state=True)
        outs.append(o_t)
    assert_close("o", torch.cat(outs, 1), o_full, 1e-5)
    assert_close("final_state", state, final_full, 1e-5)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close("o vs reference", o_full, o_ref, 1e-5)
    assert_close("final vs reference", final_full, final_ref, 1e-5)
    assert torch.isfinite(h0).all()  # the caller's state is never updated in place


def test_batched_decode_of_packed_length_one_sequences(backend, device):
    N, H, K, V = 5, 2, 16, 32
    q, k, v, g, beta, h0 = make_inputs(N, 1, H, K, V, device=device)
    h0_copy = h0.clone()
    cu_seqlens = torch.arange(N + 1, device=device, dtype=torch.int32)
    packed = [x.transpose(0, 1) for x in (q, k, v, g, beta)]  # [1, N, ...]
    o, final = fused_recurrent_gated_delta_rule(*packed, initial_state=h0, output_final_state=True,
                                                cu_seqlens=cu_seqlens)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_close("o", o, o_ref.transpose(0, 1), 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)
    assert torch.equal(h0, h0_copy)


def test_packed_uneven_prefill(backend, device):
    cu_seqlens = torch.tensor([0, 3, 3, 14, 15, 19], device=device)  # an empty sequence and a length-1 one
    N, T, H, K, V = 5, 19, 2, 16, 16
    q, k, v, g, beta, h0 = make_inputs(1, T, H, K, V, N=N, device=device)
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                cu_seqlens=cu_seqlens)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                        cu_seqlens=cu_seqlens)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)
    assert torch.equal(final[1], h0[1])


@pytest.mark.parametrize("T", [3, 17])
def test_qk_l2norm_in_kernel(backend, device, T):
    q, k, v, g, beta, h0 = make_inputs(2, T, 2, 32, 16, device=device, normalise_k=False)
    q = 3 * q
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                        use_qk_l2norm_in_kernel=True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, device, dtype):
    q, k, v, g, beta, h0 = make_inputs(2, 9, 2, 32, 32, dtype=dtype, device=device)
    h0 = h0.to(dtype)
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and final.dtype == torch.float32
    assert_close("o", o, o_ref, TOL[dtype])
    assert_close("final_state", final, final_ref, 1e-5)


@pytest.mark.parametrize("T,l2", [(3, False), (20, True)])
def test_gradients_route_to_the_torch_path(backend, device, kernel_calls, T, l2):
    inputs = make_inputs(2, T, 2, 16, 32, device=device, normalise_k=not l2)
    ours = [x.detach().clone().requires_grad_(True) for x in inputs]
    refs = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, final = fused_recurrent_gated_delta_rule(*ours[:5], initial_state=ours[5], output_final_state=True,
                                                use_qk_l2norm_in_kernel=l2)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(*refs[:5], initial_state=refs[5], output_final_state=True,
                                                        use_qk_l2norm_in_kernel=l2)
    do, dfinal = torch.randn_like(o), torch.randn_like(final)
    ((o * do).sum() + (final * dfinal).sum()).backward()
    ((o_ref * do).sum() + (final_ref * dfinal).sum()).backward()
    assert not kernel_calls
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final_state", final, final_ref, 1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), ours, refs):
        assert_close(name, a.grad, b.grad, 1e-5)


def test_bad_inputs_raise_value_errors(device):
    q, k, v, g, beta, h0 = make_inputs(2, 4, 2, 16, 16, device=device)
    with pytest.raises(ValueError, match="k must have shape"):
        fused_recurrent_gated_delta_rule(q, k[:, :3], v, g, beta)
    with pytest.raises(ValueError, match="g must have shape"):
        fused_recurrent_gated_delta_rule(q, k, v, g[..., :1], beta)
    with pytest.raises(ValueError, match="beta has dtype int64"):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta.long())
    with pytest.raises(ValueError, match="initial_state must have shape"):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0[:1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 4], device=device))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_recurrent_gated_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1],
                                         cu_seqlens=torch.tensor([0, 5], device=device))
    with pytest.raises(ValueError, match="scale"):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale="0.5")


def test_triton_path_rejects_head_dims_over_256(device, monkeypatch):
    monkeypatch.setenv("FLA_BACKEND", "triton")
    q, k, v, g, beta, _ = make_inputs(1, 1, 1, 16, 512, device=device)
    with pytest.raises(ValueError, match="V=512"):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta)


@pytest.mark.gpu
def test_gpu_decode_and_prefill(device):
    # batched decode: B32 T1 H8 K=V=128, bf16 activations, float32 cached state
    q, k, v, g, beta, h0 = make_inputs(32, 1, 8, 128, 128, dtype=torch.bfloat16, device=device)
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16
    assert_close("decode o", o, o_ref, 1e-2)
    assert_close("decode final_state", final, final_ref, 1e-5)
    # the same as packed length-1 sequences
    packed = [x.transpose(0, 1) for x in (q, k, v, g, beta)]
    o_p, final_p = fused_recurrent_gated_delta_rule(*packed, initial_state=h0, output_final_state=True,
                                                    cu_seqlens=torch.arange(33, device=device, dtype=torch.int32))
    assert_close("packed decode o", o_p, o.transpose(0, 1), 1e-2)
    assert_close("packed decode final_state", final_p, final, 1e-6)

    # prefill: B2 T100 bf16, q/k normalised in the kernel
    q, k, v, g, beta, h0 = make_inputs(2, 100, 4, 128, 128, dtype=torch.bfloat16, device=device, normalise_k=False)
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                use_qk_l2norm_in_kernel=True)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                        use_qk_l2norm_in_kernel=True)
    assert_close("prefill o", o, o_ref, 1e-2)
    assert_close("prefill final_state", final, final_ref, 1e-4)
