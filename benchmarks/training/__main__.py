"""Training throughput of each model family: tokens/s, MFU and peak memory of a full optimiser step.

    python -m benchmarks.training [--quick] [--out DIR] [--models transformer,gdn,...] [--seq-lens 4096,16384]
                                  [--tokens-per-step 32768] [--steps 10] [--size 0.4B] [--profile]

One step = forward with labels (loss inside the model), backward, AdamW step, gradients set to None; weights in
float32 under bf16 autocast on CUDA (plain float32 on the CPU). Batch size = tokens-per-step // seq_len (at least 1).
After 3 warm-up steps, ``--steps`` steps are timed one by one (CUDA-synchronised); the median gives tokens/s.
Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (weights, gradients, AdamW states and
activations). MFU: see ``benchmarks.training`` (the FLOP formula) and ``PEAK_TFLOPS``. A cell that runs out of
memory is recorded as ``oom``.

Writes OUT/training.{csv,json,txt}. Default OUT: benchmarks/results/training (benchmarks/results/quick/training with
--quick). Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from benchmarks.common import backend, default_out, device_name, parse_names, pick_device, print_table, write_json
from benchmarks.generation import MODELS, build_model
from benchmarks.training import flops_per_token, matmul_params, peak_tflops

COLUMNS = ["model", "seq_len", "batch", "status", "params_m", "step_ms", "tokens_s", "tflops", "mfu", "peak_mb",
           "loss"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure(name: str, seq_len: int, batch: int, steps: int, warmup: int, size: str, tiny: bool,
            device: str, peak: Optional[float], profile_to: Optional[str] = None) -> Dict:
    """One (model, seq_len) cell: builds the model and its optimiser, times ``steps`` optimiser steps.

    ``profile_to``: also run one more step under ``torch.profiler`` and write its table of kernels (self time on
    the device, or on the CPU without CUDA; top 40) to that file."""
    cuda = device == "cuda"
    model = build_model(name, size, tiny=tiny, device=device, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=cuda or None)
    gen = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    row: Dict = {"model": name, "seq_len": seq_len, "batch": batch, "params_m": matmul_params(model) / 1e6}

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            loss = step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        row.update(status="ok", step_ms=step_s * 1e3, tokens_s=batch * seq_len / step_s, loss=float(loss))
        row["tflops"] = flops_per_token(model, seq_len) * row["tokens_s"] / 1e12
        row["mfu"] = row["tflops"] / peak if peak else None
        if cuda:
            row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if profile_to:
            _profile_step(step, cuda, profile_to, f"{name} T{seq_len} B{batch}")
    finally:
        del model, opt
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def _profile_step(step, cuda: bool, path: str, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(f"one training step, {title}, sorted by {sort}\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90) + "\n")
    print(f"wrote {path}", flush=True)


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny configs, seq 128, 2 steps")
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list from {','.join(MODELS)}")
    parser.add_argument("--seq-lens", default=None, help="comma list (default 4096,16384; quick 128)")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="default 32768 (quick 256)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; quick 1)")
    parser.add_argument("--size", default="0.4B", help="config size suffix: 0.4B or 1.4B")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; quick: cpu)")
    parser.add_argument("--backend", default=None, choices=["auto", "triton", "torch"],
                        help="FLA_BACKEND for the run (default: triton on CUDA, auto on the CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="also write OUT/profile_<model>_T<seq_len>.txt: the kernels of one step, by time")
    args = parser.parse_args(argv)

    models = parse_names(parser, args.models, MODELS, "model(s)")
    device = pick_device(parser, args.device, args.quick)
    seq_lens = _ints(args.seq_lens) if args.seq_lens else ([128] if args.quick else [4096, 16384])
    tokens_per_step = args.tokens_per_step or (256 if args.quick else 32768)
    steps = args.steps or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    out = args.out or default_out("training", args.quick)
    os.makedirs(out, exist_ok=True)
    dev_name = device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(dev_name)
    backend_name = args.backend or ("triton" if device == "cuda" else "auto")
    if args.quick:
        torch.set_num_threads(1)  # tiny shapes: threads only add sync overhead, and CI machines are shared
    if device == "cpu":
        print("note: CPU run: float32 without autocast; no memory column; MFU needs a GPU in PEAK_TFLOPS", flush=True)
    elif peak is None:
        print(f"note: {dev_name} is not in PEAK_TFLOPS: MFU left empty", flush=True)

    rows: List[Dict] = []
    total, start = len(models) * len(seq_lens), time.perf_counter()
    with backend(backend_name):
        for name in models:
            for seq_len in seq_lens:
                batch = max(1, tokens_per_step // seq_len)
                try:
                    profile_to = os.path.join(out, f"profile_{name}_T{seq_len}.txt") if args.profile else None
                    row = measure(name, seq_len, batch, steps, warmup, args.size, args.quick, device, peak,
                                  profile_to)
                except Exception as e:  # noqa: BLE001 - report and go on with the other cells
                    if not _is_oom(e):
                        print(f"{name} T{seq_len} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    row = {"model": name, "seq_len": seq_len, "batch": batch,
                           "status": "oom" if _is_oom(e) else f"error: {type(e).__name__}"}
                rows.append(row)
                done = len(rows)
                elapsed = time.perf_counter() - start
                shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
                print(f"[{done}/{total} {elapsed:6.0f}s, ETA {elapsed / done * (total - done):5.0f}s] {shown}",
                      flush=True)

    meta = {"device": dev_name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "size": "tiny (--quick)" if args.quick else args.size, "tokens_per_step": tokens_per_step,
            "steps": steps, "backend": backend_name, "peak_tflops": peak,
            "precision": "bf16 autocast, fp32 weights, AdamW" if device == "cuda" else "float32, AdamW"}
    title = (f"training step, {meta['device']}, {meta['date']}, torch {meta['torch']}, {meta['precision']}, "
             f"FLA_BACKEND={backend_name}, {meta['size']} configs")
    text = print_table(rows, COLUMNS, title=title)
    with open(os.path.join(out, "training.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "training.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_json(os.path.join(out, "training.json"), {"meta": meta, "rows": rows})
    print(f"wrote {out}/training.csv, training.json, training.txt", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
