"""Gated delta rule on the CPU: the float32 token-by-token reference against the chunked torch path.

    python -m benchmarks.ops.benchmark_gdn_cpu [--quick] [--threads N] [--out FILE.json]

For each size: forward, and forward + backward (gradients of q, k, v, g, beta), of
``naive_recurrent_gated_delta_rule`` (token loop) and ``chunk_gated_delta_rule_torch`` (chunks of 64), wall time in
milliseconds (median of a few repeats), the speed-up, and the relative error of the chunked output against the
reference. Also one decoding step (T = 1 with a state) through ``fused_recurrent_gated_delta_rule`` on the torch
path. Prints a progress line per measurement, then a table.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
import torch.nn.functional as F

from benchmarks.common import backend, cpu_wall_ms, print_table, write_json
from fla.ops.gated_delta_rule.chunk_torch import chunk_gated_delta_rule_torch
from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from fla.utils.testing import relative_error


def make_inputs(B, T, H, K, V, requires_grad):
    q = torch.randn(B, T, H, K)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    g = F.logsigmoid(torch.randn(B, T, H) + 2.0)
    beta = torch.rand(B, T, H)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g, beta)]


def uneven_cu_seqlens(T: int, n: int) -> torch.Tensor:
    """n packed sequences of deterministic uneven lengths summing to T."""
    weights = torch.arange(1, n + 1, dtype=torch.float64) ** 1.5
    lens = (weights / weights.sum() * T).floor().long().clamp(min=1)
    lens[-1] += T - int(lens.sum())
    return F.pad(lens.cumsum(0), (1, 0))


def run_op(op, inputs, cu_seqlens, backward: bool):
    def fn():
        for x in inputs:
            x.grad = None
        o, _ = op(*inputs, None, None, False, cu_seqlens=cu_seqlens)
        if backward:
            o.sum().backward()
        return o
    return fn


def naive(q, k, v, g, beta, scale, h0, final, cu_seqlens=None):
    return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale, h0, final, False, cu_seqlens)


def bench_size(B, T, H, K, V, n_seqs: Optional[int], budget_s: float) -> dict:
    label = f"B{B} T{T} H{H} K{K} V{V}" + (f" packed x{n_seqs}" if n_seqs else "")
    cu_seqlens = uneven_cu_seqlens(T, n_seqs) if n_seqs else None
    row = {"size": label}
    inputs = make_inputs(B, T, H, K, V, requires_grad=True)
    with torch.no_grad():
        o_ref = naive(*inputs, None, None, False, cu_seqlens)[0]
        o = chunk_gated_delta_rule_torch(*inputs, None, None, False, cu_seqlens)[0]
    row["rel_err"] = f"{relative_error(o, o_ref):.1e}"
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        for name, op in (("naive", naive), ("chunk", chunk_gated_delta_rule_torch)):
            if backward:
                ms = cpu_wall_ms(run_op(op, inputs, cu_seqlens, True), budget_s)
            else:
                with torch.no_grad():
                    ms = cpu_wall_ms(run_op(op, inputs, cu_seqlens, False), budget_s)
            row[f"{name} {mode} ms"] = ms
            print(f"  {label:32s} {name:6s} {mode:8s} {ms:10.2f} ms", flush=True)
        row[f"speed-up {mode}"] = row[f"naive {mode} ms"] / row[f"chunk {mode} ms"]
    return row


def bench_decode(B, H, K, V, budget_s: float) -> dict:
    q, k, v, g, beta = make_inputs(B, 1, H, K, V, requires_grad=False)
    state = torch.randn(B, H, K, V)
    with torch.no_grad(), backend("torch"):
        ms = cpu_wall_ms(lambda: fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                                  output_final_state=True,
                                                                  use_qk_l2norm_in_kernel=True), budget_s, 200)
        ref_ms = cpu_wall_ms(lambda: naive(q, k, v, g, beta, None, state, True), budget_s, 200)
    print(f"  decode B{B} H{H} K{K} V{V}: fused_recurrent {ms * 1e3:.0f} us, naive {ref_ms * 1e3:.0f} us", flush=True)
    return {"size": f"decode B{B} T1 H{H} K{K} V{V}", "fused_recurrent us": ms * 1e3, "naive us": ref_ms * 1e3}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small size only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="write the rows as JSON to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU threads: {torch.get_num_threads()}, torch {torch.__version__}", flush=True)

    sizes = [(2, 256, 4, 64, 64, None)] if args.quick else [
        (4, 1024, 4, 64, 64, None),
        (1, 4096, 4, 64, 64, 8),
        (2, 2048, 8, 128, 128, None),
    ]
    budget = 0.5 if args.quick else 2.0
    rows = [bench_size(*size, budget_s=budget) for size in sizes]
    columns = ["size", "naive fwd ms", "chunk fwd ms", "speed-up fwd", "naive fwd+bwd ms", "chunk fwd+bwd ms",
               "speed-up fwd+bwd", "rel_err"]
    print_table(rows, columns, title="\nGated delta rule on the CPU: token loop (naive) vs chunked torch path")

    decode_rows = [bench_decode(1, 4, 64, 64, budget), bench_decode(32, 8, 128, 128, budget)]
    print_table(decode_rows, ["size", "fused_recurrent us", "naive us"], title="\nOne decoding step (no grad)")
    if args.out:
        write_json(args.out, {"threads": torch.get_num_threads(), "rows": rows, "decode": decode_rows})


if __name__ == "__main__":
    main()
