"""RMSNorm and FusedRMSNormGated: both backends against a float32 (float64 on CPU) torch reference."""

import pytest
import torch
import torch.nn.functional as F

from fla.modules import FusedRMSNormGated, RMSNorm, rms_norm
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def reference(x, weight, bias, residual, gate, activation, eps):
    s = x.double() + (residual.double() if residual is not None else 0)
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    if gate is not None:
        g = gate.double()
        y = y * (F.silu(g) if activation == "swish" else torch.sigmoid(g))
    return y, s


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


CASES = [  # (shape, dtype, residual, gate, bias, activation)
    ((2, 7, 33), torch.float32, False, False, False, "swish"),
    ((3, 5, 64), torch.float32, True, False, True, "swish"),
    ((1, 9, 100), torch.float32, True, True, False, "sigmoid"),
    ((4, 3, 2, 48), torch.float32, False, True, True, "swish"),
    ((2, 6, 96), torch.bfloat16, True, True, False, "swish"),
    ((2, 6, 80), torch.float16, True, False, False, "swish"),
]


@pytest.mark.parametrize("shape,dtype,has_res,has_gate,has_bias,activation", CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-r{int(c[2])}g{int(c[3])}b{int(c[4])}-{c[5]}" for c in CASES])
def test_rms_norm_matches_reference(backend, device, shape, dtype, has_res, has_gate, has_bias, activation):
    prenorm = has_res  # the returned residual stream gets its own gradient
    D = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(D, device=device))
    b = 0.1 * torch.randn(D, device=device) if has_bias else None
    r = torch.randn(shape, device=device).to(dtype) if has_res else None
    g = torch.randn(shape, device=device).to(dtype) if has_gate else None
    eps = 1e-5

    x1, w1, b1, r1, g1 = leaves(x, w, b, r, g)
    out = rms_norm(x1, w1, b1, residual=r1, gate=g1, activation=activation, eps=eps, prenorm=prenorm)
    y, s = out if prenorm else (out, None)
    dy = torch.randn_like(y)
    ds = torch.randn(shape, device=device).to(s.dtype) if prenorm else None
    torch.autograd.backward([y] + ([s] if prenorm else []), [dy] + ([ds] if prenorm else []))

    x2, w2, b2, r2, g2 = leaves(x, w, b, r, g)
    y_ref, s_ref = reference(x2, w2, b2, r2, g2, activation, eps)
    torch.autograd.backward([y_ref] + ([s_ref] if prenorm else []), [dy.double()] + ([ds.double()] if prenorm else []))

    tol = TOL[dtype]
    assert y.dtype == dtype
    assert_close("y", y, y_ref, tol)
    if prenorm:
        assert_close("s", s, s_ref, tol)
    assert_close("dx", x1.grad, x2.grad, tol)
    assert_close("dw", w1.grad, w2.grad, tol)
    if has_bias:
        assert_close("db", b1.grad, b2.grad, tol)
    if has_res:
        assert_close("dresidual", r1.grad, r2.grad, tol)
    if has_gate:
        assert_close("dgate", g1.grad, g2.grad, tol)


def test_prenorm_without_residual(backend, device):
    x = torch.randn(3, 17, device=device)
    y, s = rms_norm(x, torch.ones(17, device=device), prenorm=True)
    assert_close("s", s, x, 0.0)


def test_modules_forward_and_residual_in_fp32(backend, device):
    norm = RMSNorm(40, eps=1e-6).to(device)
    x = torch.randn(2, 5, 40, device=device, dtype=torch.bfloat16)
    r = torch.randn(2, 5, 40, device=device, dtype=torch.bfloat16)
    y, s = norm(x, r, prenorm=True, residual_in_fp32=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, s_ref = reference(x, norm.weight, None, r, None, "swish", 1e-6)
    assert_close("y", y, y_ref, 1e-2)
    assert_close("s", s, s_ref, 1e-6)

    gated = FusedRMSNormGated(24, eps=1e-5, activation="sigmoid").to(device)
    x, g = torch.randn(3, 4, 24, device=device), torch.randn(3, 4, 24, device=device)
    assert_close("gated", gated(x, g), reference(x, gated.weight, None, None, g, "sigmoid", 1e-5)[0], 1e-5)


def test_no_affine(backend, device):
    norm = RMSNorm(31, elementwise_affine=False).to(device)
    x = torch.randn(4, 31, device=device)
    assert norm.weight is None
    assert_close("y", norm(x), reference(x, None, None, None, None, "swish", 1e-5)[0], 1e-5)


def test_bad_inputs_raise_clear_errors(device):
    norm = RMSNorm(16).to(device)
    with pytest.raises(ValueError, match="hidden_size=16"):
        norm(torch.randn(2, 15, device=device))
    with pytest.raises(ValueError, match="residual must have shape"):
        norm(torch.randn(2, 16, device=device), torch.randn(3, 16, device=device))
    with pytest.raises(ValueError, match="x has dtype int64"):
        rms_norm(torch.ones(2, 16, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="activation='relu'"):
        FusedRMSNormGated(16, activation="relu")
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        RMSNorm(0)


def test_residual_without_prenorm(backend, device):
    x, r = leaves(torch.randn(5, 3, 40, device=device), torch.randn(5, 3, 40, device=device))
    y = rms_norm(x, None, residual=r, eps=1e-6)
    y.backward(torch.ones_like(y))
    x2, r2 = leaves(x, r)
    y_ref = reference(x2, None, None, r2, None, "swish", 1e-6)[0]
    y_ref.backward(torch.ones_like(y_ref))
    assert_close("y", y, y_ref, 1e-5)
    assert_close("dx", x.grad, x2.grad, 1e-5)
    assert_close("dresidual", r.grad, r2.grad, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True])
def test_rms_norm_large_on_gpu(gated):
    shape = (4, 2048, 1024) if not gated else (4, 2048, 16, 128)
    D = shape[-1]
    x, r, g = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w = 1 + 0.1 * torch.randn(D, device="cuda")
    x1, r1, g1, w1 = leaves(x, r, g, w)
    y, s = rms_norm(x1, w1, residual=r1, gate=g1 if gated else None, prenorm=True)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward([y, s], [dy, ds])
    x2, r2, g2, w2 = leaves(x, r, g, w)
    y_ref, s_ref = reference(x2, w2, None, r2, g2 if gated else None, "swish", 1e-6)
    torch.autograd.backward([y_ref, s_ref], [dy.double(), ds.double()])
    for name, a, b in (("y", y, y_ref), ("dx", x1.grad, x2.grad), ("dr", r1.grad, r2.grad), ("dw", w1.grad, w2.grad)):
        assert_close(name, a, b, 1e-2)
    if gated:
        assert_close("dg", g1.grad, g2.grad, 1e-2)
