"""fla.utils: backend choice, validation errors, the test helpers themselves, autocast wrappers, import hygiene."""

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from fla.utils import check_cu_seqlens, check_positive_int, check_same_device, check_tensor, use_triton
from fla.utils.autocast import autocast_custom_bwd, autocast_custom_fwd
from fla.utils.testing import assert_close, poison_fresh_allocations, relative_error


def test_backend_choice_follows_device_and_env(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("FLA_BACKEND", raising=False)
    assert use_triton(x) is (x.device.type == "cuda")
    monkeypatch.setenv("FLA_BACKEND", "torch")
    assert use_triton(x) is False
    monkeypatch.setenv("FLA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FLA_BACKEND='cuda' is not a backend; allowed: auto, torch, triton"):
        use_triton(x)


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("FLA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.zeros(1)) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        use_triton(torch.zeros(1))


def test_check_tensor_messages():
    x = torch.zeros(2, 3)
    assert check_tensor("x", x, ndim=2, dtype=torch.float32, shape=(2, None)) is x
    with pytest.raises(ValueError, match="q must be a torch.Tensor, got list"):
        check_tensor("q", [1])
    with pytest.raises(ValueError, match="q must have 4 dimensions, got shape \\(2, 3\\)"):
        check_tensor("q", x, ndim=4)
    with pytest.raises(ValueError, match="q has dtype float32; allowed: bfloat16, float16"):
        check_tensor("q", x, dtype=(torch.bfloat16, torch.float16))
    with pytest.raises(ValueError, match="q must have shape \\[2, 4\\], got \\[2, 3\\]"):
        check_tensor("q", x, shape=(2, 4))
    with pytest.raises(ValueError, match="chunks must be an integer >= 1, got 0"):
        check_positive_int("chunks", 0)
    check_same_device(a=x, b=None, c=x)


def test_check_cu_seqlens():
    x = torch.zeros(1, 10, 2)
    check_cu_seqlens(torch.tensor([0, 3, 3, 10]), x)
    with pytest.raises(ValueError, match="batch size must be 1"):
        check_cu_seqlens(torch.tensor([0, 10]), torch.zeros(2, 10))
    with pytest.raises(ValueError, match="end at T=10"):
        check_cu_seqlens(torch.tensor([0, 4, 9]), x)
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens(torch.tensor([0, 6, 4, 10]), x)
    with pytest.raises(ValueError, match="cu_seqlens has dtype float32"):
        check_cu_seqlens(torch.tensor([0.0, 10.0]), x)


def test_assert_close_rejects_nan_and_large_errors():
    ref = torch.randn(50)
    assert_close("same", ref.clone(), ref, 0.0)
    assert relative_error(ref + 1e-3 * ref, ref) == pytest.approx(1e-3, rel=1e-4)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close("off", ref * 1.1, ref, 1e-2)
    bad = ref.clone()
    bad[3] = float("nan")
    with pytest.raises(AssertionError, match="NaN/Inf"):
        assert_close("nan", bad, ref, 1.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_close("shape", ref[:3], ref, 1.0)


def test_poisoning_hits_only_fla_allocations():
    originals = (torch.empty, torch.empty_like, torch.Tensor.new_empty)
    with poison_fresh_allocations():
        mine = torch.empty(4)
        theirs = eval("torch.empty(4)", {"torch": torch, "__name__": "fla.fake"})
        ints = eval("torch.empty(4, dtype=torch.long)", {"torch": torch, "__name__": "fla.fake"})
        like = eval("torch.empty_like(x)", {"torch": torch, "x": mine, "__name__": "fla.fake"})
        new = eval("x.new_empty(3)", {"x": mine, "__name__": "fla.fake"})
    mine.fill_(0)  # a test's own allocation is not poisoned (it may hold anything): writing it must work
    assert torch.isnan(theirs).all() and torch.isnan(like).all() and torch.isnan(new).all()
    assert ints.dtype == torch.long  # integer tensors cannot hold NaN and are left alone
    assert (torch.empty, torch.empty_like, torch.Tensor.new_empty) == originals  # restored on exit


def test_autocast_wrappers_replay_forward_state_in_backward():
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        @autocast_custom_fwd
        def forward(ctx, x):
            seen["fwd"] = torch.is_autocast_enabled("cpu")
            return x * 2

        @staticmethod
        @autocast_custom_bwd
        def backward(ctx, dy):
            seen["bwd"] = torch.is_autocast_enabled("cpu")
            return dy * 2

    x = torch.randn(3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = Probe.apply(x)
    y.sum().backward()
    assert seen == {"fwd": True, "bwd": True}
    assert_close("grad", x.grad, torch.full_like(x, 2.0), 0.0)


def test_import_is_cheap_and_side_effect_free():
    code = (
        "import os, sys; before = dict(os.environ); import fla, fla.modules, fla.ops.utils; "
        "assert dict(os.environ) == before, 'import changed the environment'; "
        "assert fla.__version__; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLA_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@triton.jit
def _dot_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + m[:, None] * K + k[None, :])
    b = tl.load(B + k[:, None] * N + n[None, :])
    tl.store(C + m[:, None] * N + n[None, :], tl.dot(a, b))


@pytest.mark.interpret
def test_interpreter_bf16_dot_is_fixed():
    """conftest patches the interpreter so that a bf16 tl.dot multiplies values, not their bit patterns."""
    from fla.utils import triton_interpreting

    if not triton_interpreting():
        pytest.skip("checks the Triton CPU interpreter; on a GPU the compiled dot is used")
    a, b = torch.randn(16, 32).bfloat16(), torch.randn(32, 16).bfloat16()
    c = torch.zeros(16, 16)
    _dot_kernel[(1,)](a, b, c, M=16, N=16, K=32)
    assert_close("bf16 dot", c, a.double() @ b.double(), 1e-5)


@triton.jit
def _to_bf16_kernel(X, Y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(Y + o, tl.load(X + o).to(tl.bfloat16))


@pytest.mark.interpret
def test_interpreter_bf16_cast_rounds_to_nearest_even():
    from fla.utils import triton_interpreting

    if not triton_interpreting():
        pytest.skip("checks the Triton CPU interpreter; on a GPU the compiled cast is used")
    x = torch.randn(64) * torch.logspace(-3, 3, 64)
    x[:4] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-9, float("inf"), -0.0])  # a tie (to even) and a round-up
    y = torch.empty(64, dtype=torch.bfloat16)
    _to_bf16_kernel[(1,)](x, y, N=64)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))  # torch rounds to nearest even
