"""Timing and reporting helpers shared by the benchmark scripts (not a test: nothing here asserts speed)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch


@contextlib.contextmanager
def backend(name: str):
    """Force ``FLA_BACKEND`` to ``name`` ('torch', 'triton' or 'auto') inside the block."""
    old = os.environ.get("FLA_BACKEND")
    os.environ["FLA_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLA_BACKEND", None)
        else:
            os.environ["FLA_BACKEND"] = old


def cpu_wall_ms(fn: Callable[[], object], budget_s: float = 2.0, max_reps: int = 20) -> float:
    """Median wall time of ``fn()`` in ms: one warm-up call, then repeats until ``budget_s`` or ``max_reps`` (at
    least one)."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100, grad_to_none=None) -> float:
    """Median time of ``fn()`` in milliseconds, measured with CUDA events by ``triton.testing.do_bench``.

    ``grad_to_none``: tensors whose ``.grad`` is reset between repeats (so backward timings hold no accumulation).
    """
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                         return_mode="median"))


def graph_ms(fn: Callable[[], object], rep_ms: int = 100) -> float:
    """Median time of one replay of ``fn()`` captured in a CUDA graph, in milliseconds (``bench_ms`` timing).

    What a serving loop that captures its decode step pays: no Python, no per-kernel launch latency. ``fn`` must be
    capturable (no host syncs); it is run three times on a side stream before capture, as torch requires. Tensors
    that ``fn`` updates in place keep being updated by each replay.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay, rep_ms=rep_ms)


def run_with_anchor(anchor_path: str, script: str, args: List[str], marker: str):
    """Run ``script`` (a self-contained file: torch, triton and ``fla`` only) in a child process whose ``fla`` is the
    package in ``anchor_path`` (upstream fla-core: its package name collides with ours), and return the JSON it
    prints on the line starting with ``marker``.

    The child runs outside this repository (a temporary working directory, ``PYTHONPATH=anchor_path``, no
    ``FLA_BACKEND``), so our own ``fla`` cannot be imported by mistake.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.abspath(anchor_path)
    env.pop("FLA_BACKEND", None)
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, os.path.abspath(script), *args], env=env, cwd=cwd,
                              capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    raise RuntimeError(f"the anchor process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def gpu_kernel_ms(fn: Callable[[], object], iters: int = 10, grad_to_none=None) -> float:
    """Mean GPU time per call of ``fn()`` summed over the kernels it launches (torch.profiler), in milliseconds.

    Unlike ``bench_ms`` this leaves out the host side (Python, autograd engine, kernel launch latency), which
    dominates for short kernels timed one call at a time; in a model those launches overlap earlier GPU work.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            if grad_to_none is not None:
                for t in grad_to_none:
                    t.grad = None
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
    return total_us / iters / 1e3


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def print_table(rows: List[Dict], columns: List[str], title: Optional[str] = None) -> str:
    """Format ``rows`` (dicts) as a fixed-width text table, print it and return it."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [] if title is None else [title]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str, payload) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def parse_names(parser, text: str, allowed, what: str) -> List[str]:
    """A comma list from the command line, each name one of ``allowed`` (else a usage error naming ``what``)."""
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        parser.error(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return names


def pick_device(parser, requested: Optional[str], quick: bool) -> str:
    """--device, defaulting to CUDA when available (the CPU for --quick runs); a usage error if CUDA is asked for
    but missing."""
    device = requested or ("cpu" if quick or not torch.cuda.is_available() else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available")
    return device


def default_out(kind: str, quick: bool) -> str:
    """benchmarks/results/<kind> (benchmarks/results/quick/<kind> for --quick smoke runs)."""
    return os.path.join("benchmarks", "results", "quick" if quick else "", kind)
