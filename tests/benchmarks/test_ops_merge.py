"""``python -m benchmarks.ops --merge``: one table from runs made suite by suite (no timing, no GPU)."""

import json

import pytest

from benchmarks.ops.__main__ import main

META = {"device": "NVIDIA H200", "date": "2026-11-28", "torch": "2.11.0", "triton": "3.6.0", "quick": False,
        "dtype": "bfloat16"}


def _run(tmp_path, name, suites, ops, notes=(), **meta):
    d = tmp_path / name
    d.mkdir()
    rows = [{"op": op, "shape": "s", "mode": "fwd", "ours_ms": 1.0 + i, "anchor": "a", "anchor_ms": 2.0,
             "ours/anchor": 0.5, "note": ""} for i, op in enumerate(ops)]
    payload = {"meta": dict(META, suites=suites, wall_s=10.0, **meta), "rows": rows, "notes": list(notes),
               "errors": []}
    (d / "ops.json").write_text(json.dumps(payload))
    return str(d)


def test_merge_orders_suites_and_takes_part_of_a_run(tmp_path):
    old = _run(tmp_path, "old", ["attn", "gdn"], ["attn_full", "gdn_chunk", "gdn_decode"],
               notes=["attn: stale", "gdn: kept", "attn / lte rows and gdn rows: stale"])
    new = _run(tmp_path, "new", ["attn"], ["attn_full", "attn_decode"], notes=["attn: fresh"])
    out = tmp_path / "out"
    assert main(["--merge", new, f"{old}:gdn", "--out", str(out)]) == 0
    merged = json.loads((out / "ops.json").read_text())
    assert [r["op"] for r in merged["rows"]] == ["gdn_chunk", "gdn_decode", "attn_full", "attn_decode"]
    assert merged["rows"][2]["ours_ms"] == 1.0 and merged["rows"][3]["ours_ms"] == 2.0  # attn rows from new
    assert merged["notes"] == ["attn: fresh", "gdn: kept"]
    assert merged["meta"]["suites"] == ["gdn", "attn"]
    assert merged["meta"]["runs"]["gdn"]["from"] == f"{old}:gdn"
    assert merged["meta"]["wall_s"] == 20.0
    assert "gdn_decode" in (out / "ops.txt").read_text()


def test_merge_refusals(tmp_path):
    a = _run(tmp_path, "a", ["attn"], ["attn_full"])
    b = _run(tmp_path, "b", ["attn", "nsa"], ["attn_full", "nsa"])
    h100 = _run(tmp_path, "h100", ["nsa"], ["nsa"], device="NVIDIA H100")
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="suite 'attn' is in both"):
        main(["--merge", a, b, "--out", out])
    with pytest.raises(SystemExit, match="different device"):
        main(["--merge", a, h100, "--out", out])
    with pytest.raises(SystemExit, match="has no suite"):
        main(["--merge", f"{a}:lte", "--out", out])
    with pytest.raises(SystemExit, match="no ops.json"):
        main(["--merge", str(tmp_path), "--out", out])
    with pytest.raises(SystemExit):  # --merge without --out
        main(["--merge", a])
