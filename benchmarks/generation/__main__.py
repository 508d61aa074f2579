"""Prefill latency, decode tokens/s and peak memory of each model family against context length.

    python -m benchmarks.generation [--quick] [--out DIR] [--models transformer,gdn,...] [--batch 1,8]
                                    [--contexts 1024,...,65536] [--decode-steps 32] [--size 0.4B] [--cuda-graph]

Models (random weights, 0.4B paper configs): transformer, gdn, gdn_swa, lansa (GDN + NSA), lalte (GDN + LTE); bf16
on CUDA, float32 on the CPU. For each (model, batch, context):
    - prefill: one ``model(ids, use_cache=True, logits_to_keep=1)`` over ``context`` random tokens (median of a few
      calls after a warm-up; one call when it takes over a second);
    - decode: after that prefill, ``--decode-steps`` calls ``model(next_ids, past_key_values=cache, use_cache=True)``
      (after 3 warm-up steps); median time per step; tokens/s = batch / step time;
    - memory (CUDA only): peak allocated during prefill, peak allocated during decode (weights + cache + step
      activations), and the cache size (allocated after prefill minus before), in MiB;
    - with ``--cuda-graph``, for every model: after the eager decode steps, the step is captured once
      (``fla.models.graph_decode.GraphDecoder``) and timed the same way through ``GraphDecoder.step`` (as many
      warm-up and timed steps): ``decode_graph_ms`` / ``decode_graph_tok_s``. The full-attention (transformer) and
      NSA (lansa) caches, which grow, are first given room for the graph steps (``max_length`` = the tokens cached
      so far + warm-up + timed steps; ``reserve_cache``), so their steps write in place; the eager steps before ran
      on the unreserved cache, as ``generate()`` does (full attention then concatenates, NSA grows geometrically).
      On the CPU the capture is emulated (a ``make_fx`` trace replayed), which checks that the path runs but times
      no CUDA graph.
A cell that runs out of memory is recorded as ``oom`` and the larger contexts of that (model, batch) are skipped.

Writes OUT/generation.csv, OUT/generation.json and OUT/{latency,memory,decode}.png (one line per model, one panel
per batch size, graph-replayed decoding dashed; device, date and versions on the figure). Default OUT:
benchmarks/results/generation (benchmarks/results/quick/generation with --quick). Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from benchmarks.common import backend, default_out, device_name, parse_names, pick_device, print_table, write_json
from benchmarks.generation import MODELS, build_model, num_params

FULL_CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_CONTEXTS = [64, 128]
COLUMNS = ["model", "batch", "context", "status", "prefill_ms", "prefill_tok_s", "decode_ms", "decode_tok_s",
           "decode_graph_ms", "decode_graph_tok_s", "prefill_peak_mb", "decode_peak_mb", "cache_mb"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _median_step_ms(step, warmup_steps: int, decode_steps: int, device: str) -> float:
    """Median wall time (ms) of ``decode_steps`` calls of ``step()`` after ``warmup_steps`` untimed ones."""
    for _ in range(warmup_steps):
        _timed(step, device)
    return statistics.median(_timed(step, device) for _ in range(decode_steps))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure_graph_decode(model, cache, next_ids: torch.Tensor, decode_steps: int, warmup_steps: int,
                         device: str) -> Dict:
    """Decode-step timings through ``GraphDecoder`` on ``cache`` (captured now, after the eager steps):
    ``decode_graph_ms`` (median of ``decode_steps`` steps after ``warmup_steps``) and ``decode_graph_tok_s``. The
    decoder's ``max_length`` covers those steps: growing caches (full attention, NSA) get that room once, before
    the capture. CUDA graphs on CUDA, the ``make_fx`` emulation elsewhere."""
    from fla.models.graph_decode import GraphDecoder

    max_length = cache.get_seq_length() + warmup_steps + decode_steps
    decoder = GraphDecoder(model, cache, max_length=max_length).capture()
    ms = _median_step_ms(lambda: decoder.step(next_ids), warmup_steps, decode_steps, device)
    return {"decode_graph_ms": ms, "decode_graph_tok_s": next_ids.shape[0] / ms * 1e3}


def measure_cell(model, batch: int, context: int, decode_steps: int, device: str, vocab: int,
                 prefill_reps: int = 3, warmup_steps: int = 3, prefill_chunk: int = 0,
                 cuda_graph: bool = False) -> Dict:
    """Prefill and decode timings (and CUDA memory) of one (model, batch, context) cell.

    ``prefill_chunk`` > 0 prefills in chunks of that many tokens through the cache (lower peak memory).
    ``cuda_graph``: also time the decode step replayed as a graph (``measure_graph_decode``); a failure there is
    printed and noted in the status, and leaves the eager numbers."""
    cuda = device == "cuda"
    gen = torch.Generator().manual_seed(context + batch)
    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    next_ids = torch.randint(0, vocab, (batch, 1), generator=gen).to(device)
    row: Dict = {"batch": batch, "context": context}

    def prefill():
        if not prefill_chunk or prefill_chunk >= context:
            return model(ids, use_cache=True, logits_to_keep=1).past_key_values
        cache = None
        for start in range(0, context, prefill_chunk):
            cache = model(ids[:, start:start + prefill_chunk], past_key_values=cache, use_cache=True,
                          logits_to_keep=1).past_key_values
        return cache

    with torch.inference_mode():
        # warm-up (kernel compilation / autotuning), then timed calls
        first = _timed(prefill, device)
        times, cache = [], None
        for _ in range(prefill_reps if first < 1000 else 1):
            cache = None  # the previous call's cache must not count in this call's memory
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            _sync(device)
            t0 = time.perf_counter()
            cache = prefill()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
            if cuda:
                row["prefill_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                row["cache_mb"] = (torch.cuda.memory_allocated() - base) / 2**20
        row["prefill_ms"] = statistics.median(times)
        row["prefill_tok_s"] = batch * context / row["prefill_ms"] * 1e3

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row["decode_ms"] = _median_step_ms(lambda: model(next_ids, past_key_values=cache, use_cache=True),
                                           warmup_steps, decode_steps, device)
        row["decode_tok_s"] = batch / row["decode_ms"] * 1e3
        if cuda:
            row["decode_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        graph_failure = None
        if cuda_graph:
            try:
                row.update(measure_graph_decode(model, cache, next_ids, decode_steps, warmup_steps, device))
            except Exception as e:  # noqa: BLE001 - the eager numbers of the cell stay valid
                graph_failure = "oom" if _is_oom(e) else type(e).__name__
                print(f"B{batch} T{context}: graph decoding failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        cache = None  # frees it (not `del`: the step lambda above refers to the name)
    chunked = prefill_chunk and prefill_chunk < context
    row["status"] = f"ok (prefill in chunks of {prefill_chunk})" if chunked else "ok"
    if graph_failure is not None:
        row["status"] += f", graph failed: {graph_failure}"
    return row


def run(models: List[str], batches: List[int], contexts: List[int], decode_steps: int, size: str, tiny: bool,
        device: str, dtype: torch.dtype, prefill_chunk: int = 0, oom_chunk: int = 0,
        cuda_graph: bool = False) -> List[Dict]:
    """Sweep (model, batch, context); ``tiny`` (--quick) also means one timed prefill and one warm-up step;
    ``cuda_graph``: also the graph-replayed decode step (``measure_graph_decode``).

    A cell whose one-shot prefill runs out of memory is retried once with a chunked prefill of ``oom_chunk``
    tokens (0: no retry); one that still fails is recorded and ends that (model, batch) sweep."""
    rows: List[Dict] = []
    total = len(models) * len(batches) * len(contexts)
    done, start = 0, time.perf_counter()

    def progress(row):
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (total - done) if done else float("nan")
        shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
        print(f"[{done}/{total} {elapsed:6.0f}s, ETA {eta:5.0f}s] {shown}", flush=True)

    for name in models:
        model = build_model(name, size, tiny=tiny, device=device, dtype=dtype).eval()
        vocab = model.config.vocab_size
        print(f"{name}: {num_params(model) / 1e6:.1f}M parameters ({type(model).__name__})", flush=True)
        for batch in batches:
            skip = False
            for context in contexts:
                done += 1
                if skip:
                    row = {"model": name, "batch": batch, "context": context, "status": "skipped (oom below)"}
                else:
                    chunks = [prefill_chunk] + ([oom_chunk] if oom_chunk and not prefill_chunk else [])
                    for attempt, chunk in enumerate(chunks):
                        row = None
                        try:
                            row = {"model": name, **measure_cell(model, batch, context, decode_steps, device, vocab,
                                                                  prefill_reps=1 if tiny else 3,
                                                                  warmup_steps=1 if tiny else 3,
                                                                  prefill_chunk=chunk, cuda_graph=cuda_graph)}
                        except Exception as e:  # noqa: BLE001 - an OOM (or a failing model) must not stop the sweep
                            oom = _is_oom(e)
                            if not oom:
                                print(f"{name} B{batch} T{context} failed: {type(e).__name__}: {str(e)[:300]}",
                                      flush=True)
                            status = "oom" if oom else f"error: {type(e).__name__}"
                        # the exception (and the tensors its traceback holds) is gone here: free the memory
                        gc.collect()
                        if device == "cuda":
                            torch.cuda.empty_cache()
                        if row is not None or not oom or attempt + 1 == len(chunks):
                            break
                        print(f"{name} B{batch} T{context}: out of memory; retrying with a chunked prefill",
                              flush=True)
                    if row is None:
                        row = {"model": name, "batch": batch, "context": context, "status": status}
                        skip = True
                rows.append(row)
                progress(row)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _ok(rows, model, batch, context, key):
    for r in rows:
        if (r["model"], r["batch"], r["context"]) == (model, batch, context) and r.get(key) is not None:
            return r[key]
    return None


def goal_summary(rows: List[Dict]) -> List[str]:
    """The issue's goals, checked against this run's rows (at the contexts measured; 4K -> 64K on the GPU)."""
    lines = []
    contexts = sorted({r["context"] for r in rows})
    batch = max(r["batch"] for r in rows)
    lo = 4096 if 4096 in contexts else contexts[0]
    lte_ctx = [c for c in contexts if _ok(rows, "lalte", batch, c, "decode_peak_mb") is not None]
    if lte_ctx and lo in lte_ctx and max(lte_ctx) > lo:
        hi = max(lte_ctx)
        a, b = _ok(rows, "lalte", batch, lo, "decode_peak_mb"), _ok(rows, "lalte", batch, hi, "decode_peak_mb")
        lines.append(f"laLTE decode memory, batch {batch}, {lo} -> {hi}: {a:.0f} -> {b:.0f} MiB "
                     f"({(b / a - 1) * 100:+.1f}%; goal <= +2% from 4K to 64K)")
    else:
        lines.append("laLTE decode memory: not measured (needs CUDA)")
    both = [c for c in contexts
            if _ok(rows, "lalte", batch, c, "decode_tok_s") and _ok(rows, "transformer", batch, c, "decode_tok_s")]
    if both:
        c = max(both)
        tps = {m: _ok(rows, m, batch, c, "decode_tok_s") for m in MODELS}
        lines.append(f"decode tokens/s at context {c}, batch {batch}: " +
                     ", ".join(f"{m} {v:.0f}" for m, v in tps.items() if v is not None))
        lines.append(f"laLTE / transformer = {tps['lalte'] / tps['transformer']:.2f}x (goal >= 3x at 64K, batch 8)")
        if tps.get("lansa") is not None:
            between = min(tps["lalte"], tps["transformer"]) <= tps["lansa"] <= max(tps["lalte"], tps["transformer"])
            lines.append(f"laNSA between laLTE and transformer: {'yes' if between else 'no'}")
        fastest = max((v, m) for m, v in tps.items() if v is not None)[1]
        lines.append(f"fastest decode: {fastest} (goal: gdn)")
        graph = {m: _ok(rows, m, batch, c, "decode_graph_tok_s") for m in MODELS}
        if any(v is not None for v in graph.values()):
            lines.append(f"decode tokens/s replayed as a graph at context {c}, batch {batch}: " +
                         ", ".join(f"{m} {v:.0f}" for m, v in graph.items() if v is not None))
            if graph.get("lalte") is not None and graph.get("transformer") is not None:
                lines.append(f"laLTE / transformer, both replayed as graphs = "
                             f"{graph['lalte'] / graph['transformer']:.2f}x")
            elif graph.get("lalte") is not None:
                lines.append(f"laLTE (graph) / transformer (eager; its graph failed) = "
                             f"{graph['lalte'] / tps['transformer']:.2f}x")
        if 65536 not in both:
            lines.append(f"note: the transformer (or laLTE) has no decode number at 64K, batch {batch}; compared at "
                         f"{c}")
    return lines


def write_csv(path: str, rows: List[Dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def figure_footer(meta: Dict) -> str:
    return (f"{meta['device']} | {meta['date']} | torch {meta['torch']} | triton {meta['triton']} | "
            f"{meta['dtype']} | FLA_BACKEND={meta['backend']} | {meta['size']} configs, random weights")


def plot(rows: List[Dict], key: str, ylabel: str, title: str, path: str, meta: Dict, logy: bool = True,
         graph_key: Optional[str] = None) -> None:
    """One panel per batch size, one line per model; ``graph_key``: a second, dashed line per model (the
    graph-replayed decode numbers) in the model's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    present = {r["model"] for r in rows}
    models = [m for m in MODELS if m in present]  # fixed order and colour per model, also in merged runs
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    any_data = False
    for ax, batch in zip(axes[0], batches):
        for name in models:
            pts = [(r["context"], r[key]) for r in rows
                   if r["model"] == name and r["batch"] == batch and r.get(key) is not None]
            if pts:
                any_data = True
                ax.plot(*zip(*pts), marker="o", label=name, color=f"C{list(MODELS).index(name)}")
            graph_pts = [] if graph_key is None else [
                (r["context"], r[graph_key]) for r in rows
                if r["model"] == name and r["batch"] == batch and r.get(graph_key) is not None]
            if graph_pts:
                any_data = True
                how = "CUDA graph" if meta["device"] != "cpu" else "graph, make_fx emulation"
                ax.plot(*zip(*graph_pts), marker="x", linestyle="--", label=f"{name} ({how})",
                        color=f"C{list(MODELS).index(name)}")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["context"] for r in rows})
        ax.set_xticks(ticks, [f"{c // 1024}K" if c >= 1024 else str(c) for c in ticks])
        if logy and any_data:
            ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        if any_data:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured on this device", ha="center", va="center", transform=ax.transAxes)
    fig.text(0.5, 0.005, figure_footer(meta), ha="center", va="bottom", fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny configs, contexts 64 and 128")
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list from {','.join(MODELS)}")
    parser.add_argument("--batch", default=None, help="comma list of batch sizes (default 1,8; quick 1,2)")
    parser.add_argument("--contexts", default=None, help="comma list of context lengths")
    parser.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (default 32; quick 3)")
    parser.add_argument("--size", default="0.4B", help="config size suffix: 0.4B or 1.4B")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; quick: cpu)")
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="prefill in chunks of N tokens through the cache (default 0: one call)")
    parser.add_argument("--oom-chunk", type=int, default=4096,
                        help="when a one-shot prefill runs out of memory, retry the cell with chunks of N tokens "
                             "(0: no retry; default 4096)")
    parser.add_argument("--backend", default=None, choices=["auto", "triton", "torch"],
                        help="FLA_BACKEND for the run (default: triton on CUDA, since some of our kernels are "
                             "opt-in until validated; auto on the CPU)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time each decode step replayed as one CUDA graph (fla.models.graph_decode."
                             "GraphDecoder, captured after the eager steps; same number of warm-up and timed steps): "
                             "columns decode_graph_ms / decode_graph_tok_s, for every model (full-attention and NSA "
                             "caches get room for those steps first). On the CPU (--quick) the capture is emulated "
                             "by a make_fx trace that is replayed: it checks the path, its timings are not "
                             "CUDA-graph timings")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="run nothing: combine the generation.json of these output folders into --out")
    args = parser.parse_args(argv)

    if args.merge:
        return merge(args.merge, args.out or os.path.join("benchmarks", "results", "generation"))
    models = parse_names(parser, args.models, MODELS, "model(s)")
    device = pick_device(parser, args.device, args.quick)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches = _ints(args.batch) if args.batch else ([1, 2] if args.quick else [1, 8])
    contexts = _ints(args.contexts) if args.contexts else (QUICK_CONTEXTS if args.quick else FULL_CONTEXTS)
    decode_steps = args.decode_steps or (3 if args.quick else 32)
    out = args.out or default_out("generation", args.quick)
    os.makedirs(out, exist_ok=True)
    if device == "cpu":
        if args.quick:
            torch.set_num_threads(1)  # tiny shapes: threads only add sync overhead, and CI machines are shared
        print("note: CPU run: timings are of the torch paths in float32; no memory columns", flush=True)

    backend_name = args.backend or ("triton" if device == "cuda" else "auto")
    with backend(backend_name):
        rows = run(models, batches, contexts, decode_steps, args.size, args.quick, device, dtype,
                   prefill_chunk=args.prefill_chunk, oom_chunk=args.oom_chunk, cuda_graph=args.cuda_graph)

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    meta = {"device": device_name() if device == "cuda" else "cpu", "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton_version, "dtype": str(dtype).replace("torch.", ""),
            "size": "tiny (--quick)" if args.quick else args.size, "decode_steps": decode_steps,
            "backend": backend_name, "prefill_chunk": args.prefill_chunk, "oom_chunk": args.oom_chunk,
            "graph_decode": ("cuda graph" if device == "cuda" else "make_fx emulation") if args.cuda_graph else None}
    write_outputs(rows, meta, out)
    return 0


def merge(dirs: List[str], out: str) -> int:
    """Combine the generation.json of several runs (e.g. one per model, each under the per-command time limit of
    a lent GPU) into one set of tables and plots; the runs must come from the same card."""
    rows, metas = [], []
    for d in dirs:
        with open(os.path.join(d, "generation.json")) as f:
            payload = json.load(f)
        rows += payload["rows"]
        metas.append(payload["meta"])
    devices = {m["device"] for m in metas}
    if len(devices) > 1:
        raise SystemExit(f"refusing to merge runs from different devices: {sorted(devices)}")
    meta = dict(metas[0], merged_from=list(dirs), date=max(m["date"] for m in metas))
    os.makedirs(out, exist_ok=True)
    write_outputs(rows, meta, out)
    return 0


def write_outputs(rows: List[Dict], meta: Dict, out: str) -> None:
    """Print the table and the goal checks; write generation.{txt,csv,json} and the PNG plots into ``out``."""
    text = print_table(rows, COLUMNS, title=f"generation: {figure_footer(meta)}")
    goals = goal_summary(rows)
    print("\n".join(goals), flush=True)
    with open(os.path.join(out, "generation.txt"), "w") as f:
        f.write(text + "\n\n" + "\n".join(goals) + "\n")
    write_csv(os.path.join(out, "generation.csv"), rows)
    write_json(os.path.join(out, "generation.json"), {"meta": meta, "rows": rows, "goals": goals})
    plot(rows, "prefill_ms", "prefill latency (ms)", "prefill", os.path.join(out, "latency.png"), meta)
    plot(rows, "decode_peak_mb", "peak memory while decoding (MiB)", "decode memory",
         os.path.join(out, "memory.png"), meta)
    plot(rows, "prefill_peak_mb", "peak memory during prefill (MiB)", "prefill memory",
         os.path.join(out, "prefill_memory.png"), meta)
    plot(rows, "decode_tok_s", "decode tokens/s", "decode throughput", os.path.join(out, "decode.png"), meta,
         graph_key="decode_graph_tok_s")
    print(f"wrote {out}/generation.{{csv,json,txt}}, latency.png, memory.png, prefill_memory.png, decode.png",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
