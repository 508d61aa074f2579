"""Test set-up shared by the whole suite.

- Without CUDA, Triton kernels run in the CPU interpreter: ``TRITON_INTERPRET=1`` is set here, before ``fla`` (and
  so any ``@triton.jit`` function) is imported, and bf16 ``tl.dot`` is fixed in the interpreter.
- Tests under ``tests/ops`` and ``tests/modules`` run with fresh allocations inside ``fla`` poisoned with NaN.
- ``gpu``-marked tests are skipped without CUDA.
- The ``backend`` fixture runs a test once per implementation: 'torch' and 'triton' (interpreted on CPU).
- Every test is seeded from its node id (reproducible; override the base with FLA_TEST_SEED).
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fla.utils.testing import (  # noqa: E402
    patch_interpreter_bf16_dot,
    patch_interpreter_bf16_rounding,
    poison_fresh_allocations,
)

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    patch_interpreter_bf16_dot()
    patch_interpreter_bf16_rounding()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker); run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_poison(request):
    base = int(os.environ.get("FLA_TEST_SEED", "0"))
    torch.manual_seed(base + zlib.crc32(request.node.nodeid.encode()))
    path = str(request.node.path)
    if os.sep + os.path.join("tests", "ops") in path or os.sep + os.path.join("tests", "modules") in path:
        with poison_fresh_allocations():
            yield
    else:
        yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Force one implementation through FLA_BACKEND; yields its name."""
    monkeypatch.setenv("FLA_BACKEND", request.param)
    return request.param
