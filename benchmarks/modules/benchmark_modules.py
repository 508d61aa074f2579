"""Triton modules against torch eager and torch.compile, forward and forward+backward, on one CUDA GPU.

Also reports the peak memory of FusedLinearCrossEntropyLoss against the plain "logits = x @ W^T, then
F.cross_entropy" path at 8192 tokens, hidden 1024, vocabulary 32000 (goal: at most a quarter of the plain peak,
same loss and gradients).

    python -m benchmarks.modules.benchmark_modules [--out DIR] [--only rms_norm,swiglu] [--quick]

Prints two tables: wall time per call (do_bench; for short kernels this is host overhead: Python, autograd,
launches) and GPU kernel time per call (torch.profiler), with the speed-up of ours over eager and over compile and
the achieved bandwidth against the floor (fewest bytes moved / memory bandwidth); writes DIR/modules.{txt,json,png}
(the plot shows GPU kernel time). All columns come from the same run on the same card. The torch paths are fla's
own torch implementations (FLA_BACKEND=torch): what a CPU user runs and what torch.compile is asked to fuse.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

from benchmarks.common import backend, bench_ms, device_name, gpu_kernel_ms, peak_memory_mb, print_table, write_json
from fla.utils.testing import relative_error

DTYPE = torch.bfloat16


@dataclass
class Case:
    name: str
    shape: str
    setup: Callable[[], Tuple[Callable[[], object], List[torch.Tensor]]]  # -> (fn, leaves needing grad)


def _leaf(*shape, dtype=DTYPE, scale=1.0):
    return (scale * torch.randn(*shape, device="cuda")).to(dtype).requires_grad_(True)


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _as_list(out) -> List[torch.Tensor]:
    return [t for t in out if isinstance(t, torch.Tensor)] if isinstance(out, (tuple, list)) else [out]


def cases(quick: bool) -> List[Case]:
    from fla.modules import FusedRMSNormGated, GatedMLP, L2Norm, RMSNorm, RotaryEmbedding, ShortConvolution, swiglu

    B, T = (2, 2048) if quick else (8, 4096)
    N = B * T

    def rms_norm_residual():
        norm = RMSNorm(1024).cuda()
        x, r = _leaf(B, T, 1024), _leaf(B, T, 1024)
        return (lambda: norm(x, r, prenorm=True)), [x, r, norm.weight]

    def rms_norm_gated():
        norm = FusedRMSNormGated(128).cuda()
        x, g = _leaf(B, T, 16, 128), _leaf(B, T, 16, 128)
        return (lambda: norm(x, g)), [x, g, norm.weight]

    def short_conv():
        conv = ShortConvolution(2048, 4).cuda()
        x = _leaf(B, T, 2048)
        return (lambda: conv(x)[0]), [x, conv.weight]

    def rotary():
        rope = RotaryEmbedding(64).cuda()
        q, k = _leaf(B, T, 16, 64), _leaf(B, T, 16, 64)
        return (lambda: rope(q, k)), [q, k]

    def l2norm():
        norm = L2Norm()
        x = _leaf(B, T, 16, 128)
        return (lambda: norm(x)), [x]

    def swiglu_case():
        g, u = _leaf(B, T, 2816), _leaf(B, T, 2816)
        return (lambda: swiglu(g, u)), [g, u]

    def gated_mlp():
        mlp = GatedMLP(1024).cuda().to(DTYPE)
        x = _leaf(B, T, 1024)
        return (lambda: mlp(x)), [x] + list(mlp.parameters())

    def cross_entropy():
        from fla.modules.fused_cross_entropy import FusedCrossEntropyLoss

        loss = FusedCrossEntropyLoss()
        logits = _leaf(8192, 32000)
        target = torch.randint(0, 32000, (8192,), device="cuda")
        return (lambda: loss(logits, target)), [logits]

    return [
        Case("rms_norm+residual", f"[{B},{T},1024]", rms_norm_residual),
        Case("rms_norm_gated", f"[{B},{T},16,128]", rms_norm_gated),
        Case("short_conv(k=4,silu)", f"[{B},{T},2048]", short_conv),
        Case("rotary", f"q,k [{B},{T},16,64]", rotary),
        Case("l2norm", f"[{B},{T},16,128]", l2norm),
        Case("swiglu", f"[{B},{T},2816]", swiglu_case),
        Case("gated_mlp", f"[{B},{T},1024]", gated_mlp),
        Case("cross_entropy", "[8192,32000]", cross_entropy),
    ]


def _time_case(case: Case, bandwidth: float) -> List[dict]:
    fn, leaves = case.setup()
    with backend("torch"):
        ref_out = [t.detach() for t in _as_list(fn())]
    dy = [torch.randn_like(t) for t in ref_out]
    in_bytes = _nbytes(leaves)
    out_bytes = _nbytes(ref_out)
    # a generic estimate of the fewest bytes: read inputs, write outputs; the backward also reads the inputs and dy
    # and writes one gradient per input (a kernel that needs fewer, e.g. RMSNorm with its residual, can beat it)
    floor_bytes = {"fwd": in_bytes + out_bytes, "fwd+bwd": 3 * in_bytes + 2 * out_bytes}

    def fwd():
        return fn()

    def fwdbwd():
        torch.autograd.backward(_as_list(fn()), dy)

    compiled = torch.compile(fn)

    def cfwd():
        return compiled()

    def cfwdbwd():
        torch.autograd.backward(_as_list(compiled()), dy)

    rows = []
    for mode, eager_fn, compiled_fn in (("fwd", fwd, cfwd), ("fwd+bwd", fwdbwd, cfwdbwd)):
        row = {"module": case.name, "shape": case.shape, "mode": mode}
        with backend("torch"):
            row["eager_ms"] = bench_ms(eager_fn, grad_to_none=leaves)
            row["eager_gpu_ms"] = gpu_kernel_ms(eager_fn, grad_to_none=leaves)
            try:
                row["compile_ms"] = bench_ms(compiled_fn, grad_to_none=leaves)
                row["compile_gpu_ms"] = gpu_kernel_ms(compiled_fn, grad_to_none=leaves)
            except Exception as e:  # a compile failure is reported, not hidden
                row["compile_ms"] = row["compile_gpu_ms"] = None
                row["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        with backend("triton"):
            row["triton_ms"] = bench_ms(eager_fn, grad_to_none=leaves)
            row["triton_gpu_ms"] = gpu_kernel_ms(eager_fn, grad_to_none=leaves)
            out = _as_list(fn())
        row["rel_err_vs_torch"] = max(relative_error(o.float(), r.float()) for o, r in zip(out, ref_out))
        row["x_eager"] = row["eager_ms"] / row["triton_ms"]
        row["x_compile"] = row["compile_ms"] / row["triton_ms"] if row["compile_ms"] else None
        row["x_compile_gpu"] = row["compile_gpu_ms"] / row["triton_gpu_ms"] if row["compile_gpu_ms"] else None
        row["floor_ms"] = floor_bytes[mode] / bandwidth * 1e3  # memory-bound floor (gated_mlp is matmul-bound)
        row["triton_GB/s"] = floor_bytes[mode] / row["triton_gpu_ms"] / 1e6
        rows.append(row)
        print(f"  {case.name:22s} {mode:8s} eager {row['eager_ms']:.3f}  compile {row['compile_ms'] or float('nan'):.3f}  "
              f"triton {row['triton_ms']:.3f} ms", flush=True)
    return rows


def linear_cross_entropy_memory(num_tokens=8192, hidden=1024, vocab=32000, num_chunks=8) -> List[dict]:
    """Peak memory and time of FusedLinearCrossEntropyLoss vs the plain path, with loss and gradient errors."""
    from fla.modules.fused_linear_cross_entropy import FusedLinearCrossEntropyLoss

    x = _leaf(num_tokens, hidden)
    w = _leaf(vocab, hidden, scale=0.02)
    target = torch.randint(0, vocab, (num_tokens,), device="cuda")
    target[::17] = -100
    flce = FusedLinearCrossEntropyLoss(num_chunks=num_chunks)

    def plain():
        logits = x @ w.t()
        loss = F.cross_entropy(logits.float(), target, ignore_index=-100)
        loss.backward()
        return loss

    def fused():
        loss = flce(x, target, w)
        loss.backward()
        return loss

    rows = []
    results = {}
    for name, fn in (("plain logits + F.cross_entropy", plain), (f"FusedLinearCrossEntropyLoss ({num_chunks} chunks)", fused)):
        x.grad = w.grad = None
        peak = peak_memory_mb(fn)
        x.grad = w.grad = None
        loss = fn()
        results[name] = (loss.detach().float(), x.grad.float(), w.grad.float())
        ms = bench_ms(fn, grad_to_none=[x, w])
        rows.append({"path": name, "peak_MiB": peak, "fwd+bwd_ms": ms})
    (l0, dx0, dw0), (l1, dx1, dw1) = results.values()
    rows[1]["loss_rel_err"] = relative_error(l1, l0)
    rows[1]["dx_rel_err"] = relative_error(dx1, dx0)
    rows[1]["dw_rel_err"] = relative_error(dw1, dw0)
    rows[1]["peak_ratio"] = rows[1]["peak_MiB"] / rows[0]["peak_MiB"]
    return rows


def plot(rows: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        sel = [r for r in rows if r["mode"] == mode]
        names = [r["module"] for r in sel]
        idx = range(len(sel))
        for off, key, label in ((-0.27, "eager_gpu_ms", "torch eager"), (0, "compile_gpu_ms", "torch.compile"),
                                (0.27, "triton_gpu_ms", "fla Triton")):
            ax.bar([i + off for i in idx], [r[key] or 0 for r in sel], width=0.27, label=label)
        ax.set_xticks(list(idx))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{mode} ({device_name()}, bf16)")
        ax.set_ylabel("GPU kernel time per call, ms")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="folder for json/png")
    parser.add_argument("--only", default="", help="comma-separated module names to run")
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--bandwidth", type=float, default=4.27,
                        help="device memory bandwidth in TB/s for the floor column (H200 copy: 4.27; H100: about 3.0)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    only = set(filter(None, args.only.split(",")))
    rows = []
    for case in cases(args.quick):
        if only and case.name not in only:
            continue
        rows += _time_case(case, args.bandwidth * 1e12)
    mem = linear_cross_entropy_memory() if not only or "flce" in only else []
    text = print_table(rows, ["module", "shape", "mode", "eager_ms", "compile_ms", "triton_ms", "x_eager", "x_compile",
                              "rel_err_vs_torch"],
                       title=f"\nmodules, bf16, {device_name()}: wall time per call (do_bench median, host overhead included)")
    text += "\n" + print_table(rows, ["module", "mode", "eager_gpu_ms", "compile_gpu_ms", "triton_gpu_ms", "x_compile_gpu",
                                      "floor_ms", "triton_GB/s"],
                               title="\nGPU kernel time per call (torch.profiler; floor = fewest bytes / bandwidth)")
    if mem:
        text += "\n" + print_table(mem, ["path", "peak_MiB", "fwd+bwd_ms", "peak_ratio", "loss_rel_err", "dx_rel_err",
                                          "dw_rel_err"], title="\nlinear + cross-entropy, 8192 tokens, hidden 1024, vocab 32000")
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "modules.json"), {"device": device_name(), "modules": rows, "flce": mem})
    with open(os.path.join(args.out, "modules.txt"), "w") as f:
        f.write(text + "\n")
    if rows:
        plot(rows, os.path.join(args.out, "modules.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
