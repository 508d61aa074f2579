"""The ahead-of-time resource check compiles a kernel for sm_90 on a CPU-only machine and reads ptxas' report.

Runs in a child process: the test session sets TRITON_INTERPRET=1 (no CUDA), under which jit functions cannot be
compiled."""

import json
import os
import subprocess
import sys

import pytest


def _last_json_line(snippet: str):
    """Run ``snippet`` in a child Python without TRITON_INTERPRET (the repository on its path); its last line of
    output, parsed as JSON."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", snippet], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


SNIPPET = """
import json
from benchmarks.ops.kernel_resources import compile_one
from fla.ops.attn import parallel_kernels as pk
c = dict(HQ=2, H=2, G=1, DK=32, DV=32, BM=32, BN=32, BK=32, BV=32, IS_VARLEN=False, USE_WINDOW=True, PRECISION="ieee")
seconds, info = compile_one(pk._attn_fwd_kernel, c, "fp32", False, 4, 2, 90)
print(json.dumps(info))
"""


def test_compile_one_reports_registers_and_spills():
    info = _last_json_line(SNIPPET)
    assert set(info) == {"registers", "spill_stores", "spill_loads"}
    assert 16 <= info["registers"] <= 255
    assert info["spill_stores"] >= 0 and info["spill_loads"] >= 0


ROUTER_SNIPPET = """
import json
from benchmarks.ops import kernel_resources as kr
kr.ROUTER_CASES = kr.ROUTER_CASES[:1] + kr.ROUTER_CASES[-2:]  # the paper's bf16 stack, one and four convolutions
print(json.dumps(kr.router_step_rows(90)))
"""


def test_router_step_kernel_compiles_for_sm90_without_spills():
    """The LTE router decode kernel compiles for Hopper at the paper's stack (and with one / four convolutions)
    without spilling in bf16 / fp16."""
    rows = _last_json_line(ROUTER_SNIPPET)
    assert [r["mask"] for r in rows] == ["convs [3, 3, 3] dil [2, 2, 2]", "convs [5] dil [1]",
                                         "convs [3, 3, 3, 3] dil [1, 1, 2, 2]"]
    for r in rows:
        assert 16 <= r["registers"] <= 255 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
