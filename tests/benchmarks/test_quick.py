"""Smoke test of the benchmark entry points: each ``--quick`` run exits 0 and writes its files (no timing asserted)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

CASES = {
    "ops": ["ops.txt", "ops.json"],
    "generation": ["generation.csv", "generation.json", "latency.png", "memory.png", "decode.png"],
    "training": ["training.csv", "training.json", "training.txt", "profile_lalte_T128.txt"],
    "ops.benchmark_attn_cpu": ["attn_cpu.json", "attn_cpu.txt", "attn_cpu.png"],
}
# generation: the graph-replayed decode step too (emulated on the CPU), so the --cuda-graph path runs in CI
EXTRA_ARGS = {"training": ["--profile"], "generation": ["--cuda-graph"]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_quick_entry_point(name, tmp_path):
    env = dict(os.environ)
    # the suite's conftest turns the Triton interpreter on; the quick runs time the torch paths, as a CPU user would
    env.pop("TRITON_INTERPRET", None)
    env.pop("FLA_BACKEND", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    out = tmp_path / name
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out), *EXTRA_ARGS.get(name, [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{log}"
    for filename in CASES[name]:
        path = out / filename
        assert path.is_file() and path.stat().st_size > 0, f"{name} --quick did not write {filename}"
    if name == "generation":  # graph columns for every model, growing caches (transformer, lansa) reserved
        import json

        rows = json.loads((out / "generation.json").read_text())["rows"]
        graphed = {r["model"] for r in rows if r.get("decode_graph_tok_s") is not None}
        assert graphed == {"transformer", "gdn", "gdn_swa", "lansa", "lalte"}, graphed
