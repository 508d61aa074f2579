"""Every op benchmark in one run, one table: ours beside each anchor available here, as ratios from the same run.

    python -m benchmarks.ops [--quick] [--out DIR] [--only gdn,attn,nsa,lte] [--anchor-path DIR] [--no-flex]
                             [--device cuda|cpu]

Suites (see ``benchmarks/ops/runner.py``): gdn (chunk fwd / fwd+bwd, decode step; anchor fla-core via
``--anchor-path``, timed in a child process), attn (full and sliding-window prefill vs torch SDPA, FlexAttention and
fla-core's ``parallel_attn``; decode step vs SDPA, eager and as CUDA-graph replays), nsa (prefill vs full causal SDPA and, without the window branch,
vs fla-core's ``parallel_nsa``; decode step vs SDPA over the cache, eager and as CUDA-graph replays), lte (training attention
vs our sliding window and FlexAttention; decode step vs full-attention decode). Shapes: the paper's 0.4B and 1.4B
layer shapes on CUDA (bf16, do_bench medians); ``--quick`` runs tiny shapes on the CPU (float32, torch paths,
wall-clock medians; CUDA-only anchors skipped with a note) in well under a minute.

Writes OUT/ops.{txt,json}. Default OUT: benchmarks/results/ops (benchmarks/results/quick/ops with --quick).
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
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
    args = parser.parse_args(argv)

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
    title = (f"ops: {meta['device']}, {meta['date']}, torch {meta['torch']}, triton {triton_version}, "
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
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
