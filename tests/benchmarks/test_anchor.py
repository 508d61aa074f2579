"""The anchor child process sees upstream's ``fla`` (from --anchor-path), never ours."""

import os
import textwrap

import pytest

from benchmarks.common import run_with_anchor
from benchmarks.ops.runner import _fla_core_rows


def test_child_imports_the_anchor_package(tmp_path):
    anchor = tmp_path / "anchor"
    (anchor / "fla").mkdir(parents=True)
    (anchor / "fla" / "__init__.py").write_text("__version__ = 'upstream-test'\n")
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        import fla
        print("@@M@@" + json.dumps({"version": fla.__version__, "file": fla.__file__, "args": sys.argv[1:],
                                    "backend": os.environ.get("FLA_BACKEND")}))
    """))
    os.environ["FLA_BACKEND"] = "torch"
    try:
        out = run_with_anchor(str(anchor), str(script), ["a", "1"], "@@M@@")
    finally:
        del os.environ["FLA_BACKEND"]
    assert out["version"] == "upstream-test"
    assert out["file"].startswith(str(anchor))
    assert out["args"] == ["a", "1"] and out["backend"] is None


def test_child_failure_is_reported(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("raise SystemExit('anchor refused')\n")
    with pytest.raises(RuntimeError, match="anchor refused"):
        run_with_anchor(str(tmp_path), str(script), [], "@@M@@")


def test_fla_core_rows_need_cuda_and_a_path():
    notes = []
    assert _fla_core_rows(None, "cuda", [], notes, "attn") == {}
    assert _fla_core_rows("/nowhere", "cpu", [], notes, "nsa") == {}
    assert notes == ["attn: the fla-core anchor needs --anchor-path DIR and CUDA; skipped",
                     "nsa: the fla-core anchor needs --anchor-path DIR and CUDA; skipped"]
