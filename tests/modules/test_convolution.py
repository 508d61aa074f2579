"""ShortConvolution / causal_conv1d: both backends against a float64 per-sequence F.conv1d reference."""

import pytest
import torch
import torch.nn.functional as F

from fla.modules.convolution import ShortConvolution, causal_conv1d, causal_conv1d_update
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def reference(x, weight, bias=None, residual=None, initial_state=None, activation=None, cu_seqlens=None, mask=None):
    """float64 (y, final_state): a loop over sequences of F.conv1d, left-padded with the initial state (or zeros)."""
    x = x.double()
    if mask is not None:
        x = x * mask.unsqueeze(-1).double()
    B, T, C = x.shape
    w = weight.double().reshape(C, -1)
    K = w.shape[1]
    b = bias.double() if bias is not None else None
    if cu_seqlens is None:
        spans = [(n, 0, T) for n in range(B)]
    else:
        cu = cu_seqlens.tolist()
        spans = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]
    rows, finals = [[] for _ in range(B)], []
    for n, (row, start, end) in enumerate(spans):
        xs = x[row, start:end].T  # [C, L]
        state = initial_state[n].double() if initial_state is not None else x.new_zeros(C, K)
        if end > start:
            z = F.conv1d(torch.cat([state[:, 1:], xs], -1)[None], w[:, None, :], b, groups=C)[0].T
            rows[row].append(F.silu(z) if activation in ("silu", "swish") else z)
        finals.append(torch.cat([state, xs], -1)[:, -K:])
    y = torch.stack([torch.cat(r, 0) for r in rows])
    if residual is not None:
        y = y + residual.double()
    return y, torch.stack(finals)


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def check_against_reference(x, w, b, r, h0, activation, cu_seqlens=None, mask=None, tol=1e-5):
    """Forward (y, final state) and the gradients of x, weight, bias, residual and initial state."""
    x1, w1, b1, r1, h1 = leaves(x, w, b, r, h0)
    y, final = causal_conv1d(x1, w1, b1, residual=r1, initial_state=h1, output_final_state=True,
                             activation=activation, cu_seqlens=cu_seqlens, mask=mask)
    assert y.dtype == x.dtype and final.dtype == (h0.dtype if h0 is not None else x.dtype)
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    torch.autograd.backward([y, final], [dy, dfinal])

    x2, w2, b2, r2, h2 = leaves(x, w, b, r, h0)
    y_ref, final_ref = reference(x2, w2, b2, r2, h2, activation, cu_seqlens, mask)
    torch.autograd.backward([y_ref, final_ref], [dy.double(), dfinal.double()])

    assert_close("y", y, y_ref, tol)
    assert_close("final_state", final, final_ref, tol)
    assert_close("dx", x1.grad, x2.grad, tol)
    assert_close("dweight", w1.grad, w2.grad, tol)
    for name, a, ref in (("dbias", b1, b2), ("dresidual", r1, r2), ("dinitial_state", h1, h2)):
        if a is not None:
            assert_close(name, a.grad, ref.grad, tol)
    return y, final


CASES = [  # (B, T, C, K, activation, bias, initial state, residual, dtype)
    (2, 1, 5, 4, "silu", False, True, False, torch.float32),
    (2, 7, 24, 4, "silu", True, False, True, torch.float32),
    (1, 33, 48, 3, None, True, True, False, torch.float32),
    (3, 7, 5, 2, "swish", True, True, True, torch.float32),
    (2, 33, 24, 4, "silu", False, True, True, torch.bfloat16),
    (2, 9, 5, 1, None, True, True, False, torch.float32),
    (1, 150, 48, 6, "silu", True, True, True, torch.float32),  # several time tiles per backward program
]


def case_id(c):
    return f"B{c[0]}T{c[1]}C{c[2]}K{c[3]}-{c[4]}-b{int(c[5])}h{int(c[6])}r{int(c[7])}-{str(c[8])[6:]}"


@pytest.mark.parametrize("B,T,C,K,activation,has_bias,has_h0,has_res,dtype", CASES, ids=[case_id(c) for c in CASES])
def test_matches_reference(backend, device, B, T, C, K, activation, has_bias, has_h0, has_res, dtype):
    x = torch.randn(B, T, C, device=device).to(dtype)
    w = 0.5 * torch.randn(C, 1, K, device=device)  # nn.Conv1d layout
    b = 0.1 * torch.randn(C, device=device) if has_bias else None
    r = torch.randn(B, T, C, device=device).to(dtype) if has_res else None
    h0 = torch.randn(B, C, K, device=device).to(dtype) if has_h0 else None
    check_against_reference(x, w, b, r, h0, activation, tol=TOL[dtype])


VARLEN = [  # (lens, C, K, activation, bias, initial state, dtype)
    ([5, 1, 11], 24, 4, "silu", True, True, torch.float32),
    ([2, 0, 1, 13], 5, 3, None, False, True, torch.float32),
    ([17, 1, 6], 24, 4, "silu", False, False, torch.bfloat16),
    ([70, 1, 45], 48, 4, "silu", True, True, torch.float32),
]


def varlen_id(c):
    return f"{'-'.join(map(str, c[0]))}-C{c[1]}K{c[2]}-{c[3]}-b{int(c[4])}h{int(c[5])}-{str(c[6])[6:]}"


@pytest.mark.parametrize("lens,C,K,activation,has_bias,has_h0,dtype", VARLEN, ids=[varlen_id(c) for c in VARLEN])
def test_varlen_matches_reference(backend, device, lens, C, K, activation, has_bias, has_h0, dtype):
    N, T = len(lens), sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=device, dtype=torch.int32)
    x = torch.randn(1, T, C, device=device).to(dtype)
    w = 0.5 * torch.randn(C, K, device=device)
    b = 0.1 * torch.randn(C, device=device) if has_bias else None
    r = torch.randn(1, T, C, device=device).to(dtype)
    h0 = torch.randn(N, C, K, device=device).to(dtype) if has_h0 else None
    y, final = check_against_reference(x, w, b, r, h0, activation, cu_seqlens=cu, tol=TOL[dtype])
    # no leak between packed sequences: each one alone gives the same output
    for n in range(N):
        s, e = int(cu[n]), int(cu[n + 1])
        if e == s:
            continue
        y_n, f_n = causal_conv1d(x[:, s:e], w, b, residual=r[:, s:e], initial_state=h0[n:n + 1] if has_h0 else None,
                                 output_final_state=True, activation=activation)
        assert_close(f"y[{n}]", y[:, s:e], y_n, TOL[dtype])
        assert_close(f"final[{n}]", final[n:n + 1], f_n, TOL[dtype])


def test_mask_zeroes_padded_inputs(backend, device):
    B, T, C = 2, 9, 16
    x = torch.randn(B, T, C, device=device)
    x_before = x.clone()
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[0, :3] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    w, b, h0 = torch.randn(C, 4, device=device), torch.randn(C, device=device), torch.randn(B, C, 4, device=device)
    check_against_reference(x, w, b, None, h0, "silu", mask=mask)
    assert torch.equal(x, x_before), "the caller's x was modified"
    x1 = x.clone().requires_grad_(True)
    y, _ = causal_conv1d(x1, w, b, initial_state=h0, activation="silu", mask=mask.bool())
    y.sum().backward()
    assert (x1.grad[0, :3] == 0).all() and (x1.grad[1, 7:] == 0).all()


def test_prefill_in_two_chunks_equals_one(backend, device):
    conv = ShortConvolution(20, kernel_size=4, bias=True).to(device)
    x = torch.randn(2, 11, 20, device=device)
    with torch.no_grad():
        y, final = conv(x, output_final_state=True)
        y1, state = conv(x[:, :2], output_final_state=True)  # shorter than the kernel: zeros fill in
        y2, final2 = conv(x[:, 2:], cache=state, output_final_state=True)
    assert_close("y", torch.cat([y1, y2], 1), y, 1e-5)
    assert_close("final_state", final2, final, 1e-6)
    assert torch.equal(state[..., :2], torch.zeros_like(state[..., :2]))


@pytest.mark.parametrize("varlen", [False, True])
def test_step_decoding_equals_forward(backend, device, varlen):
    B, T, C, K = 3, 6, 24, 4
    conv = ShortConvolution(C, kernel_size=K, bias=True).to(device)
    x = torch.randn(B, T, C, device=device)
    r = torch.randn(B, T, C, device=device)
    h0 = torch.randn(B, C, K, device=device)
    with torch.no_grad():
        y_full, final_full = conv(x, residual=r, cache=h0, output_final_state=True)
        cache = h0.clone()
        ys = []
        for t in range(T):
            if varlen:  # the N sequences packed along time, one token each
                cu = torch.arange(B + 1, device=device, dtype=torch.int32)
                y_t, out = conv.step(x[:, t][None], residual=r[:, t][None], cache=cache, cu_seqlens=cu)
                y_t = y_t[0][:, None]
            else:
                y_t, out = conv.step(x[:, t:t + 1], residual=r[:, t:t + 1], cache=cache)
            assert out is cache, "step must update the cache in place and return it"
            ys.append(y_t)
        # forward with one token and a cache takes the decoding path; it must not touch the given cache
        before = h0.clone()
        y_one, state_one = conv(x[:, :1], residual=r[:, :1], cache=h0, output_final_state=True)
        assert torch.equal(h0, before)
    assert_close("y", torch.cat(ys, 1), y_full, 1e-5)
    assert_close("final_state", cache, final_full, 1e-6)
    assert_close("y (T=1 forward)", y_one, y_full[:, :1], 1e-5)
    _, state_ref = reference(x[:, :1], conv.weight, None, None, h0)
    assert_close("state (T=1 forward)", state_one, state_ref, 1e-6)


def test_step_without_cache_and_update_out_of_place(backend, device):
    conv = ShortConvolution(8, kernel_size=3, activation=None).to(device)
    x = torch.randn(2, 1, 8, device=device)
    with torch.no_grad():
        y, cache = conv.step(x)
        y_ref, _ = conv(x)
    assert_close("y", y, y_ref, 1e-6)
    assert cache.shape == (2, 8, 3) and torch.equal(cache[..., -1], x[:, 0])
    old = cache.clone()
    y2, new = causal_conv1d_update(x, cache, conv.weight, activation=None, inplace=False)
    assert torch.equal(cache, old) and new is not cache and torch.equal(new[..., :2], old[..., 1:])


def test_module_layout_and_state_dict(device):
    conv = ShortConvolution(12, kernel_size=4).to(device)
    assert isinstance(conv, torch.nn.Conv1d)
    assert list(conv.state_dict()) == ["weight"] and conv.weight.shape == (12, 1, 4)
    assert conv.activation == "silu" and conv.state_size == 48
    with_bias = ShortConvolution(12, kernel_size=3, bias=True, activation=None).to(device)
    assert sorted(with_bias.state_dict()) == ["bias", "weight"] and with_bias.bias.shape == (12,)
    assert "activation=None" in repr(with_bias)
    # the module computes nn.Conv1d's own causal convolution
    x = torch.randn(2, 9, 12, device=device)
    y, _ = with_bias(x)
    y_ref = torch.nn.Conv1d.forward(with_bias, x.transpose(1, 2))[..., :9].transpose(1, 2)
    assert_close("y", y, y_ref, 1e-5)


def test_bad_inputs_raise_clear_errors(device):
    C, K = 8, 4
    x = torch.randn(2, 5, C, device=device)
    w = torch.randn(C, K, device=device)
    cu = torch.tensor([0, 2, 5], device=device)
    with pytest.raises(ValueError, match="activation='relu'"):
        ShortConvolution(C, activation="relu")
    with pytest.raises(ValueError, match="kernel_size"):
        ShortConvolution(C, kernel_size=0)
    with pytest.raises(ValueError, match="hidden_size=8"):
        ShortConvolution(C)(torch.randn(2, 5, C + 1, device=device))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        causal_conv1d(x[0], w)
    with pytest.raises(ValueError, match="x has dtype int64"):
        causal_conv1d(x.long(), w)
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d(x, torch.randn(C + 1, K, device=device))
    with pytest.raises(ValueError, match="bias must have shape"):
        causal_conv1d(x, w, torch.randn(C + 1, device=device))
    with pytest.raises(ValueError, match="residual must have shape"):
        causal_conv1d(x, w, residual=x[:, :4])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        causal_conv1d(x, w, initial_state=torch.randn(2, C, K + 1, device=device))
    with pytest.raises(ValueError, match="initial_state must have shape"):  # N = number of sequences
        causal_conv1d(x[:1], w, initial_state=torch.randn(1, C, K, device=device), cu_seqlens=cu)
    with pytest.raises(ValueError, match="initial_state is on meta"):
        causal_conv1d(x, w, initial_state=torch.randn(2, C, K, device="meta"))
    with pytest.raises(ValueError, match="batch size must be 1"):
        causal_conv1d(x, w, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens has dtype float32"):
        causal_conv1d(x[:1], w, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        causal_conv1d(x[:1], w, cu_seqlens=torch.tensor([0, 2, 4], device=device))
    with pytest.raises(ValueError, match="mask must have shape"):
        causal_conv1d(x, w, mask=torch.ones(2, 4, device=device))
    with pytest.raises(ValueError, match="activation='gelu'"):
        causal_conv1d(x, w, activation="gelu")
    with pytest.raises(ValueError, match="one token per sequence"):
        causal_conv1d_update(x, None, w)
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        causal_conv1d_update(x[:1], None, w, cu_seqlens=torch.tensor([0, 1, 2, 3, 5, 5], device=device))
    with pytest.raises(ValueError, match="cache must have shape"):
        causal_conv1d_update(x[:, :1], torch.zeros(3, C, K, device=device), w)


@pytest.mark.gpu
class TestConvolutionOnGPU:
    """Bigger shapes on CUDA: the Triton kernels against the float64 reference (run on the GPU machine)."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("activation", ["silu", None])
    def test_dense(self, dtype, activation):
        B, T, C, K = 2, 1031, 1024, 4
        x = torch.randn(B, T, C, device="cuda").to(dtype)
        w = 0.5 * torch.randn(C, 1, K, device="cuda")
        b = 0.1 * torch.randn(C, device="cuda")
        r = torch.randn(B, T, C, device="cuda").to(dtype)
        h0 = torch.randn(B, C, K, device="cuda").to(dtype)
        check_against_reference(x, w, b, r, h0, activation, tol=TOL[dtype])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_varlen(self, dtype):
        lens, C, K = [1000, 1, 517, 3, 1200], 1024, 4
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
        x = torch.randn(1, sum(lens), C, device="cuda").to(dtype)
        w = 0.5 * torch.randn(C, K, device="cuda")
        h0 = torch.randn(len(lens), C, K, device="cuda").to(dtype)
        check_against_reference(x, w, None, None, h0, "silu", cu_seqlens=cu, tol=TOL[dtype])

    def test_step_and_torch_path_agree(self, monkeypatch):
        B, T, C = 4, 37, 1024
        conv = ShortConvolution(C, bias=True).to("cuda", torch.bfloat16)
        x = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)
        h0 = torch.randn(B, C, 4, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y, final = conv(x, cache=h0, output_final_state=True)
            cache = h0.clone()
            ys = [conv.step(x[:, t:t + 1], cache=cache)[0] for t in range(T)]
            monkeypatch.setenv("FLA_BACKEND", "torch")
            y_torch, final_torch = conv(x, cache=h0, output_final_state=True)
        assert_close("y step", torch.cat(ys, 1), y, 1e-2)
        assert_close("final step", cache, final, 1e-2)
        assert_close("y torch", y_torch, y, 1e-2)
        assert_close("final torch", final_torch, final, 1e-2)
