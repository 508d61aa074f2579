"""l2norm / L2Norm: both backends against a float64 reference, forward and backward."""

import pytest
import torch

from fla.modules.l2norm import L2Norm
from fla.ops.utils.l2norm import l2norm
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def reference(x, eps):
    x = x.double()
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps)


CASES = [  # (shape, dtype, output_dtype, eps, scale of x)
    ((3, 5, 16), torch.float32, None, 1e-6, 1.0),
    ((7, 60), torch.float32, None, 1e-6, 1.0),
    ((37, 128), torch.bfloat16, None, 1e-6, 1.0),
    ((1, 9, 128), torch.bfloat16, torch.float32, 1e-6, 1.0),
    ((2, 3, 2, 16), torch.float32, None, 1e-2, 0.05),  # eps comparable to sum(x^2): checks it sits inside the sqrt
]


@pytest.mark.parametrize("shape,dtype,output_dtype,eps,scale", CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-out{str(c[2])[6:] if c[2] else 'same'}-eps{c[3]}" for c in CASES])
def test_l2norm_matches_reference(backend, device, shape, dtype, output_dtype, eps, scale):
    x = (scale * torch.randn(shape, device=device)).to(dtype)
    x1 = x.clone().requires_grad_(True)
    y = l2norm(x1, eps=eps, output_dtype=output_dtype)
    assert y.dtype == (output_dtype or dtype) and y.shape == x.shape
    dy = torch.randn_like(y)
    y.backward(dy)
    assert x1.grad.dtype == dtype

    x2 = x.clone().double().requires_grad_(True)
    y_ref = reference(x2, eps)
    y_ref.backward(dy.double())
    tol = TOL[output_dtype or dtype]
    assert_close("y", y, y_ref, tol)
    assert_close("dx", x1.grad, x2.grad, TOL[dtype])


def test_module_and_zero_rows(backend, device):
    norm = L2Norm(eps=1e-6)
    x = torch.randn(5, 60, device=device)
    x[2] = 0.0  # a zero row stays zero (and finite)
    x1 = x.clone().requires_grad_(True)
    y = norm(x1)
    y.sum().backward()
    assert_close("y", y, reference(x, 1e-6), 1e-5)
    assert torch.all(y[2] == 0) and torch.isfinite(x1.grad).all()
    assert L2Norm(output_dtype=torch.float32)(x.bfloat16()).dtype == torch.float32
    assert len(list(norm.parameters())) == 0 and "eps=1e-06" in repr(norm)


def test_non_contiguous_input(backend, device):
    x = torch.randn(4, 16, 6, device=device).transpose(1, 2)  # [4, 6, 16], not contiguous
    x1 = x.detach().clone().requires_grad_(True)
    y = l2norm(x1)
    dy = torch.randn_like(y)
    y.backward(dy)
    x2 = x.detach().double().requires_grad_(True)
    reference(x2, 1e-6).backward(dy.double())
    assert_close("y", y, reference(x, 1e-6), 1e-5)
    assert_close("dx", x1.grad, x2.grad, 1e-5)


def test_bad_inputs_raise_clear_errors(device):
    with pytest.raises(ValueError, match="x has dtype int64"):
        l2norm(torch.ones(2, 16, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        l2norm([1.0, 2.0])
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        l2norm(torch.ones(2, 16, device=device), eps=-1.0)
    with pytest.raises(ValueError, match="output_dtype=torch.int32 is not allowed"):
        l2norm(torch.ones(2, 16, device=device), output_dtype=torch.int32)
    with pytest.raises(ValueError, match="0-d tensor"):
        l2norm(torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        L2Norm(eps=-1)
    with pytest.raises(ValueError, match="output_dtype=torch.int64 is not allowed"):
        L2Norm(output_dtype=torch.int64)


@pytest.mark.gpu
def test_l2norm_triton_large_gpu():
    x = torch.randn(2, 2048, 16, 128, device="cuda", dtype=torch.bfloat16)
    x1 = x.clone().requires_grad_(True)
    y = l2norm(x1)
    dy = torch.randn_like(y)
    y.backward(dy)
    x2 = x.double().requires_grad_(True)
    reference(x2, 1e-6).backward(dy.double())
    assert_close("y", y, reference(x, 1e-6), 1e-2)
    assert_close("dx", x1.grad, x2.grad, 1e-2)
    xf = torch.randn(4097, 100, device="cuda")  # fp32, row count not a multiple of the block, D not a power of 2
    assert_close("y fp32", l2norm(xf), reference(xf, 1e-6), 1e-5)
