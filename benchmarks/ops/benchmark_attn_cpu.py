"""The attention ops' torch paths on the CPU: query blocks against one dense-mask SDPA call.

    python -m benchmarks.ops.benchmark_attn_cpu [--quick] [--threads N] [--lengths 2048,4096,...] [--out DIR]

For sliding-window attention (``parallel_attn``, window w) and LTE attention (``parallel_lte_attn``, window w,
about 12.5% of the tokens selected, 4 sinks), at B1-H16-D64 and each length T: forward, and forward + backward
(gradients of q, k, v and the score), of the torch path in blocks of query rows (the default,
``fla.ops.utils.sdpa``) and of the same path as one SDPA call over the dense [T, T] mask (``query_block=T``, the
path before the blocks). Each measurement runs in a fresh process, so that its peak resident memory (above the
inputs) is its own. The dense call is skipped where its mask and float bias would pass ``--dense-limit-gib``.
Prints a line per measurement, then a table; writes DIR/attn_cpu.{json,txt,png} (time and peak memory against T).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from typing import Dict, List, Optional

import torch

from benchmarks.common import cpu_wall_ms, print_table, write_json

B, H, D = 1, 16, 64
SELECTED = 0.125
SINKS = 4


def _inputs(T: int, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g).requires_grad_(grad) for _ in range(3))
    score = (torch.rand(B, T, H, generator=g) - (1 - SELECTED)).requires_grad_(grad)
    return q, k, v, score


def _run(op: str, T: int, window: int, rows: Optional[int], grad: bool):
    """One call of the op's torch path; returns the output (for the error check)."""
    from fla.ops.attn.parallel import parallel_attn_torch
    from fla.ops.lte import select_tokens
    from fla.ops.lte.parallel import parallel_lte_attn_torch

    q, k, v, score = _inputs(T, grad)
    with torch.set_grad_enabled(grad):
        if op == "swa":
            o = parallel_attn_torch(q, k, v, D ** -0.5, window, query_block=rows)
        else:
            selected = select_tokens(score.detach(), SINKS)
            o = parallel_lte_attn_torch(q, k, v, score, selected, window, D ** -0.5, query_block=rows)
        if grad:
            o.sum().backward()
    return o.detach()


def _measure(op: str, T: int, window: int, rows: Optional[int], grad: bool, budget_s: float, threads: int):
    """In a child process: (median ms, peak resident memory above the start in GiB, output)."""
    import fla.ops.attn.parallel  # noqa: F401  (imports before the baseline)
    import fla.ops.lte.parallel  # noqa: F401

    torch.set_num_threads(threads)
    _inputs(T, grad)  # the inputs' own memory is counted in the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ms = cpu_wall_ms(lambda: _run(op, T, window, rows, grad), budget_s, max_reps=5)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2 ** 20  # KiB -> GiB
    return ms, peak, _run(op, T, window, rows, False) if not grad else None


def measure(op: str, T: int, window: int, rows: Optional[int], grad: bool, budget_s: float, threads: int):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (op, T, window, rows, grad, budget_s, threads))


def bench(op: str, T: int, window: int, grad: bool, budget_s: float, threads: int, dense_limit_gib: float) -> Dict:
    name = f"{op} B{B} T{T} H{H} D{D} w{window}"
    row = {"case": name, "pass": "fwd+bwd" if grad else "fwd", "T": T, "op": op}
    t0 = time.perf_counter()
    ms, peak, o_blocked = measure(op, T, window, None, grad, budget_s, threads)
    row.update({"blocked ms": ms, "blocked peak GiB": peak})
    # the dense call's mask and its float bias: one [T, T] for the window, one per head for LTE's selections
    mask_gib = (1 if op == "swa" else B * H) * T * T * 5 / 2 ** 30
    if mask_gib <= dense_limit_gib:
        ms_d, peak_d, o_dense = measure(op, T, window, T, grad, budget_s, threads)
        row.update({"dense ms": ms_d, "dense peak GiB": peak_d, "speed-up": ms_d / ms})
        if o_blocked is not None:
            row["rel_err"] = f"{float((o_blocked - o_dense).norm() / o_dense.norm()):.1e}"
    else:
        row["dense ms"] = f"skipped (mask {mask_gib:.1f} GiB)"
    dense = row["dense ms"] if isinstance(row["dense ms"], str) else f"{row['dense ms']:.0f} ms / {peak_d:.2f} GiB"
    print(f"  {name} {row['pass']}: blocked {ms:.0f} ms / {peak:.2f} GiB, dense {dense} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def plot(rows: List[Dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for op in ("swa", "lte"):
        for kind, style in (("blocked", "-o"), ("dense", "--x")):
            pts = [(r["T"], r[f"{kind} ms"], r[f"{kind} peak GiB"]) for r in rows
                   if r["op"] == op and r["pass"] == "fwd+bwd" and isinstance(r.get(f"{kind} ms"), float)]
            if pts:
                Ts, ms, gib = zip(*pts)
                axes[0].plot(Ts, [m / 1e3 for m in ms], style, label=f"{op} {kind}")
                axes[1].plot(Ts, gib, style, label=f"{op} {kind}")
    for ax, ylabel in zip(axes, ("forward + backward, s", "peak memory above inputs, GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"torch paths on the CPU ({torch.get_num_threads()} threads), B{B} H{H} D{D}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 1024 only, short timing budget (a smoke run)")
    parser.add_argument("--lengths", default=None, help="comma list of T (default 2048,4096,8192,16384)")
    parser.add_argument("--window", type=int, default=768)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dense-limit-gib", type=float, default=6.0,
                        help="skip the dense call where its mask and float bias would pass this")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "ops"))
    args = parser.parse_args(argv)
    lengths = [int(t) for t in (args.lengths or ("1024" if args.quick else "2048,4096,8192,16384")).split(",")]
    threads = args.threads or torch.get_num_threads()
    budget = 0.5 if args.quick else 3.0
    print(f"CPU threads: {threads}, torch {torch.__version__}", flush=True)
    rows = [bench(op, T, args.window, grad, budget, threads, args.dense_limit_gib)
            for op in ("swa", "lte") for T in lengths for grad in (False, True)]
    columns = ["case", "pass", "dense ms", "blocked ms", "speed-up", "dense peak GiB", "blocked peak GiB", "rel_err"]
    text = print_table(rows, columns, title=f"\nAttention torch paths on the CPU ({threads} threads): one dense-mask "
                                             f"SDPA call vs query blocks")
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "attn_cpu.json"), {"threads": threads, "torch": torch.__version__,
                                                         "rows": rows})
    with open(os.path.join(args.out, "attn_cpu.txt"), "w") as f:
        f.write(text + "\n")
    png = plot(rows, os.path.join(args.out, "attn_cpu.png"))
    print(f"wrote {args.out}/attn_cpu.json, attn_cpu.txt" + (", attn_cpu.png" if png else ""), flush=True)
    return rows


if __name__ == "__main__":
    main()
