"""Where an op's time goes: per-kernel CUDA-time breakdowns from ``torch.profiler``, for NSA (``parallel_nsa``
forward and forward+backward, the decode step) and LTE's decode step (cache update + attention).

    python -m benchmarks.ops.profile_ops [--cases nsa,nsa-decode,lte-decode] [--shape B,T,HQ,H,D] [--window 512]
                                         [--decode-cache 4096 65536] [--top 25]

Prints, per case, the wall time of one call (median of ``bench_ms``) and the kernels sorted by total CUDA time with
their call counts; the sum of kernel times beside the wall time says how much is launch / host overhead. CUDA only.
"""

from __future__ import annotations

import argparse
from typing import Callable, List

import torch

from benchmarks.common import backend, bench_ms


def kernel_table(fn: Callable[[], object], reps: int = 5, top: int = 25) -> List[str]:
    """Lines: CUDA time per call (us) and calls per call of each kernel of ``fn``, largest first."""
    from benchmarks.ops.gdn_kernel_profile import kernel_rows

    rows = kernel_rows(fn, reps)
    lines = [f"  kernels: {sum(r['calls'] for r in rows):.0f} launches, {sum(r['us'] for r in rows):.1f} us of "
             "kernel time"]
    lines += [f"  {r['us']:10.1f} us  x{r['calls']:4.1f}  {r['kernel'][:110]}" for r in rows[:top]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8,4096,32,2,64", help="B,T,HQ,H,D")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--block-counts", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--decode-cache", type=int, nargs="*", default=[4096, 65536])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cases", default="nsa,nsa-decode,lte-decode")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_ops needs a CUDA GPU")
    cases = args.cases.split(",")
    B, T, HQ, H, D = (int(x) for x in args.shape.split(","))
    bs, sc, w = args.block_size, args.block_counts, args.window
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)

    def inputs(b, t, grad):
        q = torch.randn(b, t, HQ, D, device=dev, dtype=dt, requires_grad=grad)
        k = torch.randn(b, t, H, D, device=dev, dtype=dt, requires_grad=grad)
        v = torch.randn(b, t, H, D, device=dev, dtype=dt, requires_grad=grad)
        gates = [torch.rand(b, t, HQ, device=dev, dtype=dt, requires_grad=grad) for _ in range(3)]
        return q, k, v, gates

    with backend("triton"):
        if "nsa" in cases:
            profile_prefill(inputs(B, T, True), bs, sc, w, args.top, f"B{B}-T{T}-HQ{HQ}-H{H}-D{D} bs{bs} S{sc}")
            torch.cuda.empty_cache()
        for S in args.decode_cache if "nsa-decode" in cases else []:
            profile_decode(inputs(B, S, False), bs, sc, w, args.top, f"B{B} S{S}")
            torch.cuda.empty_cache()
        if "lte-decode" in cases:
            profile_lte_decode(args.top)


def profile_lte_decode(top: int, B: int = 8, HQ: int = 16, H: int = 16, D: int = 64, window: int = 768,
                       buffer_size: int = 512) -> None:
    """LTE's decode step as ``benchmarks.ops.benchmark_lte`` times it (cache update + attention), eager and as one
    CUDA-graph replay."""
    from benchmarks.common import graph_ms
    from fla.ops.lte.cache import lte_cache_step, lte_empty_cache
    from fla.ops.lte.decoding import lte_decoding_one_step

    dt = torch.bfloat16
    kc, vc, sc, sk, va = lte_empty_cache(B, window, buffer_size, H, D, D, dtype=dt, device="cuda")
    kc.normal_(); vc.normal_(); sc.uniform_(-0.5, 0.5); va.fill_(True)
    q = torch.randn(B, 1, HQ, D, device="cuda", dtype=dt)
    new_k, new_v = torch.randn(B, H, D, device="cuda", dtype=dt), torch.randn(B, H, D, device="cuda", dtype=dt)
    slot = torch.zeros(B, dtype=torch.long, device="cuda")
    ones = torch.ones(B, dtype=torch.bool, device="cuda")
    no_sink = ~ones  # a constant, built once: the model's step does not pay this launch

    def step():
        slot.add_(1).remainder_(window + 1)
        lte_cache_step(kc, vc, sc, sk, va, slot, new_k, new_v, ones, no_sink, window)
        return lte_decoding_one_step(q, kc, vc, va)

    print(f"lte decode step B{B}-HQ{HQ}-H{H}-D{D} w{window} b{buffer_size}: eager {bench_ms(step):.4f} ms, "
          f"graph {graph_ms(step):.4f} ms")
    print("\n".join(kernel_table(step, top=top)), flush=True)


def profile_prefill(tensors, bs: int, sc: int, w: int, top: int, label: str) -> None:
    from fla.ops.nsa import parallel_nsa

    q, k, v, (gc, gs, gw) = tensors
    do = torch.randn_like(q)
    leaves = [q, k, v, gc, gs, gw]
    for window in (w, 0):
        def fwd(window=window):
            return parallel_nsa(q, k, v, gc, gs, gw if window else None, block_counts=sc, block_size=bs,
                                window_size=window)

        def fwdbwd(fwd=fwd):
            for t in leaves:
                t.grad = None
            fwd().backward(do)

        for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            ms = bench_ms(fn, grad_to_none=leaves)
            print(f"parallel_nsa {name} {label} w{window}: {ms:.3f} ms")
            print("\n".join(kernel_table(fn, top=top)), flush=True)


def profile_decode(tensors, bs: int, sc: int, w: int, top: int, label: str) -> None:
    from fla.ops.nsa import mean_pool_blocks, nsa_decoding_one_step

    q, k, v, (gc, gs, gw) = tensors
    q, gc, gs, gw = q[:, -1:], gc[:, -1:], gs[:, -1:], gw[:, -1:]
    k_cmp, v_cmp = mean_pool_blocks(k, bs), mean_pool_blocks(v, bs)
    lens = torch.full((q.shape[0],), k.shape[1], dtype=torch.long, device=q.device)

    def step():
        return nsa_decoding_one_step(q, k, v, k_cmp, v_cmp, lens, gc, gs, gw, block_counts=sc, block_size=bs,
                                     window_size=w)

    ms = bench_ms(step)
    print(f"nsa_decoding_one_step {label}: {ms:.3f} ms")
    print("\n".join(kernel_table(step, top=top)), flush=True)


if __name__ == "__main__":
    main()
