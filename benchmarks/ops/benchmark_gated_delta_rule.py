"""Chunked gated delta rule on one CUDA GPU: forward and forward+backward times (median of do_bench), bf16.

    python -m benchmarks.ops.benchmark_gated_delta_rule [--anchor-path DIR] [--out DIR] [--quick]

Shapes (B, T, H, D = K = V): 8x4096x8x128, 4x4096x8x256, 1x32768x8x128, with ``use_qk_l2norm_in_kernel=True``
(what the Gated DeltaNet layer calls), inputs needing gradients.

Optional anchor: ``--anchor-path DIR`` where DIR holds upstream flash-linear-attention's ``fla`` package (e.g. the
unpacked pure-Python fla-core wheel). Its package name collides with ours, so it is timed in a child process that
sees only DIR (PYTHONPATH=DIR, run outside this repository); the table then shows both and ours/anchor (below 1:
ours is faster). Upstream refuses its backward on Hopper with Triton < 3.7.1 (its issue #640): such a cell shows the
error instead of a time.

Also one decoding step (``fused_recurrent_gated_delta_rule``, T = 1 with a state) at B = 1 and 32, H8 D128 (mode
``decode``), beside the anchor's when given.

Writes OUT/gated_delta_rule.{txt,json} (default OUT: benchmarks/results). Nothing here asserts a speed.
``measure`` / ``compare`` also serve ``python -m benchmarks.ops`` (which runs ``measure`` with ``device="cpu"``,
float32 and the torch paths in its CPU smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SHAPES = [(8, 4096, 8, 128), (4, 4096, 8, 256), (1, 32768, 8, 128)]
QUICK_SHAPES = [(2, 2048, 8, 128), (1, 2048, 8, 256)]
DECODE_SHAPES = [(1, 8, 128), (32, 8, 128)]  # (B, H, D) of one decoding step
MODES = ("fwd", "fwdbwd")
RESULT_MARKER = "@@GDN_BENCH_RESULT@@"


def _median_ms(fn, device: str, warmup_ms: int, rep_ms: int, grad_to_none=None) -> float:
    """``triton.testing.do_bench`` (median) on CUDA; a wall-clock median of a few calls elsewhere."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                             return_mode="median"))
    import statistics
    import time

    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start) * 1e3 < rep_ms and len(times) < 20:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(shapes, warmup_ms: int = 25, rep_ms: int = 100, decode_shapes=(), device: str = "cuda"):
    """Time ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` (and, for ``decode_shapes`` (B, H, D), one
    ``fused_recurrent_gated_delta_rule`` step with a state) from whichever ``fla`` is importable.

    Self-contained (torch, triton and that ``fla`` only) so the child process of the anchor can run it.
    bf16 on CUDA, float32 elsewhere. Returns a list of {"shape", "mode", "ms"} or {"shape", "mode", "error"}.
    """
    import torch
    import torch.nn.functional as F

    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for B, T, H, D in shapes:
        torch.manual_seed(0)
        q = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True)
        g = F.logsigmoid(torch.randn(B, T, H, device=device, dtype=torch.float32)).requires_grad_(True)
        beta = torch.rand(B, T, H, device=device, dtype=dtype).requires_grad_(True)
        leaves = [q, k, v, g, beta]
        do = torch.randn_like(v)

        def fwd():
            return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]

        def fwdbwd():
            fwd().backward(do)

        name = f"B{B}-T{T}-H{H}-D{D}"
        for mode, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            try:
                for _ in range(3):  # compile / autotune outside the timing
                    fn()
                for t in leaves:
                    t.grad = None
                ms = _median_ms(fn, device, warmup_ms, rep_ms, grad_to_none=leaves)
                rows.append({"shape": name, "mode": mode, "ms": float(ms)})
            except Exception as e:  # noqa: BLE001 - the anchor may refuse (e.g. its Hopper guard); report it
                rows.append({"shape": name, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            if device == "cuda":
                torch.cuda.synchronize()
        del q, k, v, g, beta, leaves, do
        if device == "cuda":
            torch.cuda.empty_cache()
    for B, H, D in decode_shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, 1, H, D, device=device, dtype=dtype) for _ in range(3))
        g = F.logsigmoid(torch.randn(B, 1, H, device=device, dtype=torch.float32))
        beta = torch.rand(B, 1, H, device=device, dtype=dtype)
        state = torch.randn(B, H, D, D, device=device, dtype=torch.float32)

        def step():
            return fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                                    use_qk_l2norm_in_kernel=True)

        name = f"B{B}-H{H}-D{D}"
        try:
            with torch.no_grad():
                for _ in range(3):
                    step()
                rows.append({"shape": name, "mode": "decode", "ms": _median_ms(step, device, warmup_ms, rep_ms)})
        except Exception as e:  # noqa: BLE001
            rows.append({"shape": name, "mode": "decode", "error": f"{type(e).__name__}: {str(e)[:120]}"})
    return rows


def measure_anchor(anchor_path: str, shapes, warmup_ms: int, rep_ms: int, decode_shapes=()):
    """Run ``measure`` in a child process that imports ``fla`` from ``anchor_path`` only."""
    from benchmarks.common import run_with_anchor

    return run_with_anchor(anchor_path, __file__, ["--worker", json.dumps(shapes), str(warmup_ms), str(rep_ms),
                                                   json.dumps(list(decode_shapes))], RESULT_MARKER)


def _worker(argv) -> int:
    shapes = [tuple(s) for s in json.loads(argv[0])]
    decode_shapes = [tuple(s) for s in json.loads(argv[3])] if len(argv) > 3 else []
    rows = measure(shapes, int(argv[1]), int(argv[2]), decode_shapes)
    import fla

    print(RESULT_MARKER + json.dumps({"rows": rows, "fla_file": fla.__file__,
                                      "fla_version": getattr(fla, "__version__", "?")}))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return _worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchor-path", default=None, help="folder holding upstream's `fla` package (optional)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    from benchmarks.common import device_name, print_table, write_json

    shapes = QUICK_SHAPES if args.quick else SHAPES
    # our Triton kernels are opt-in until proven on Hopper (fla/ops/gated_delta_rule/chunk.py): ask for them
    os.environ["FLA_BACKEND"] = "triton"
    ours = measure(shapes, args.warmup_ms, args.rep_ms, DECODE_SHAPES)
    anchor, anchor_info = None, None
    if args.anchor_path:
        result = measure_anchor(args.anchor_path, shapes, args.warmup_ms, args.rep_ms, DECODE_SHAPES)
        anchor = result["rows"]
        anchor_info = {"fla_file": result["fla_file"], "fla_version": result["fla_version"]}

    table = compare(ours, anchor)
    columns = ["shape", "mode", "ours_ms"] + (["anchor_ms", "ours/anchor"] if anchor is not None else [])
    title = f"chunk_gated_delta_rule, bf16, l2norm in kernel, {device_name()}, triton {_triton_version()}"
    if anchor_info:
        title += f"; anchor fla {anchor_info['fla_version']} ({anchor_info['fla_file']})"
    text = print_table(table, columns, title=title)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gated_delta_rule.txt"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(args.out, "gated_delta_rule.json"),
               {"device": device_name(), "triton": _triton_version(), "torch": torch.__version__,
                "anchor": anchor_info, "rows": table})
    return 0


def compare(ours, anchor=None):
    """Table rows {shape, mode, ours_ms[, anchor_ms, ours/anchor]} from ``measure``'s rows (an error string stands
    in for a time that could not be measured)."""
    by_key = {(r["shape"], r["mode"]): r for r in anchor or []}
    table = []
    for r in ours:
        row = {"shape": r["shape"], "mode": r["mode"], "ours_ms": r.get("ms", r.get("error"))}
        if anchor is not None:
            a = by_key.get((r["shape"], r["mode"]), {})
            row["anchor_ms"] = a.get("ms", a.get("error"))
            if "ms" in a and "ms" in r:
                row["ours/anchor"] = r["ms"] / a["ms"]
        table.append(row)
    return table


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
