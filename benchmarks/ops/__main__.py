"""Every op benchmark in one run, one table: ours beside each anchor available here, as ratios from the same run.

    python -m benchmarks.ops [--quick] [--out DIR] [--only gdn,attn,nsa,lte] [--anchor-path DIR] [--no-flex]
                             [--device cuda|cpu]
    python -m benchmarks.ops --merge DIR[:suite,...] [DIR ...] --out DIR    # one table from separate runs

Suites (see ``benchmarks/ops/runner.py``): gdn (chunk fwd / fwd+bwd, decode step; anchor fla-core via
``--anchor-path``, timed in a child process), attn (full and sliding-window prefill vs torch SDPA, FlexAttention
and fla-core's ``parallel_attn``; decode step vs SDPA, eager and as CUDA-graph replays), nsa (prefill vs full causal
SDPA and, without the window branch, vs fla-core's ``parallel_nsa``; decode step vs SDPA over the cache, eager and
as CUDA-graph replays), lte (training attention vs our sliding window and FlexAttention; decode step vs
full-attention decode). Shapes: the paper's 0.4B and 1.4B layer shapes on CUDA (bf16, do_bench medians);
``--quick`` runs tiny shapes on the CPU (float32, torch paths, wall-clock medians; CUDA-only anchors skipped with a
note) in well under a minute.

Writes OUT/ops.{txt,json}. Default OUT: benchmarks/results/ops (benchmarks/results/quick/ops with --quick).
``--merge`` combines the ops.json of runs made one suite at a time (e.g. each under the per-command time limit of a
lent GPU) into one table: the runs must come from the same card type and versions, a suite may come from one run
only (``DIR:gdn`` takes only that run's gdn rows), and ``meta.runs`` records the run of each suite (ratios are
comparable inside one row only). Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import List, Optional

import torch

from benchmarks.common import default_out, device_name, parse_names, pick_device, print_table, write_json
from benchmarks.ops.runner import SUITES, run_suites

COLUMNS = ["op", "shape", "mode", "ours_ms", "anchor", "anchor_ms", "ours/anchor", "note"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes; on the CPU unless --device cuda")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default=",".join(SUITES), help=f"comma list from {','.join(SUITES)}")
    parser.add_argument("--anchor-path", default=None, help="folder holding upstream's `fla` (fla-core) package")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; quick: cpu)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="combine the ops.json of these runs (DIR or DIR:suite,suite) into one table in --out")
    args = parser.parse_args(argv)
    if args.merge:
        if not args.out:
            parser.error("--merge needs --out DIR")
        return merge(args.merge, args.out)

    names = parse_names(parser, args.only, SUITES, "suite(s)")
    device = pick_device(parser, args.device, args.quick)
    out = args.out or default_out("ops", args.quick)
    if device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only add sync overhead, and CI machines are shared
        print("note: CPU run: tiny shapes, float32, our torch paths, wall-clock medians", flush=True)

    start = time.perf_counter()
    rows, notes, errors = run_suites(names, args.quick, device, use_flex=not args.no_flex,
                                     anchor_path=args.anchor_path, progress=lambda s: print(s, flush=True))
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    meta = {"device": device_name() if device == "cuda" else "cpu", "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton_version, "quick": args.quick,
            "dtype": "bfloat16" if device == "cuda" else "float32", "suites": names,
            "wall_s": round(time.perf_counter() - start, 1)}
    write_outputs(out, meta, rows, notes, errors)
    return 1 if errors else 0


def write_outputs(out: str, meta: dict, rows: List[dict], notes: List[str], errors: List[str]) -> None:
    """Print the table (notes and errors below it) and write OUT/ops.{txt,json}."""
    title = (f"ops: {meta['device']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['dtype']} (ms, median; ours/anchor < 1: ours faster)")
    text = print_table(rows, COLUMNS, title=title)
    for line in [f"note: {n}" for n in notes] + [f"error: {e}" for e in errors]:
        print(line)
        text += "\n" + line
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ops.txt"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(out, "ops.json"), {"meta": meta, "rows": rows, "notes": notes, "errors": errors})
    print(f"wrote {out}/ops.txt, ops.json ({meta['wall_s']}s)", flush=True)


def merge(dirs: List[str], out: str) -> int:
    """One table from runs made suite by suite: rows in ``SUITES`` order, ``meta.runs`` = {suite: its run's
    folder, date and wall time}. Refuses runs from different devices, dtypes or versions, and a suite present in
    two runs (which of the two to keep is the caller's choice: ``DIR:gdn,nsa`` takes only those suites of a run)."""
    payloads = []
    for arg in dirs:
        d, _, only = arg.partition(":")
        path = os.path.join(d, "ops.json")
        if not os.path.isfile(path):
            raise SystemExit(f"--merge: no ops.json in {d!r}")
        with open(path) as f:
            payload = json.load(f)
        if only:  # DIR:gdn,nsa takes only those suites of that run
            wanted = only.split(",")
            missing = [x for x in wanted if x not in payload["meta"]["suites"]]
            if missing:
                raise SystemExit(f"--merge: {d!r} has no suite {missing} (it has {payload['meta']['suites']})")
            payload["meta"]["suites"] = wanted
        payloads.append((arg, payload))
    for key in ("device", "dtype", "torch", "triton", "quick"):
        values = {str(p["meta"].get(key)) for _, p in payloads}
        if len(values) > 1:
            raise SystemExit(f"--merge: refusing to merge runs with different {key}: {sorted(values)}")
    owner = {}
    for d, p in payloads:
        for suite in p["meta"]["suites"]:
            if suite in owner:
                raise SystemExit(f"--merge: suite {suite!r} is in both {owner[suite]!r} and {d!r}; pass one of them")
            owner[suite] = d
    rows, notes, errors, runs = [], [], [], {}
    for suite in [s for s in SUITES if s in owner]:
        d, p = next((d, p) for d, p in payloads if d == owner[suite])
        rows += [r for r in p["rows"] if _suite_of(r["op"]) == suite]
        runs[suite] = {"from": d, "date": p["meta"]["date"], "wall_s": p["meta"]["wall_s"]}
    for arg, p in payloads:  # a run taken in part keeps only the notes and errors of its suites ("nsa: ...")
        taken = [s for s in p["meta"]["suites"] if owner.get(s) == arg]
        keep = (lambda line: True) if ":" not in arg else (
            lambda line: any(line.startswith(f"{s}:") or line.startswith(f"{s} ") for s in taken))
        notes += [n for n in p["notes"] if keep(n) and n not in notes]
        errors += [e for e in p["errors"] if keep(e)]
    first = payloads[0][1]["meta"]
    meta = dict(first, suites=list(runs), date=max(p["meta"]["date"] for _, p in payloads),
                wall_s=round(sum(r["wall_s"] for r in runs.values()), 1), runs=runs)
    write_outputs(out, meta, rows, notes, errors)
    return 1 if errors else 0


def _suite_of(op: str) -> str:
    """The suite a row's op belongs to: the op name's first word (gdn_chunk -> gdn, attn_swa768 -> attn)."""
    return op.split("_")[0]


if __name__ == "__main__":
    sys.exit(main())
