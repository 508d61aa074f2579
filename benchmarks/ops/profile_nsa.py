"""Where NSA's time goes: a per-kernel CUDA-time breakdown of ``parallel_nsa`` (forward, forward+backward) and of
the decode step, from ``torch.profiler``.

    python -m benchmarks.ops.profile_nsa [--shape B,T,HQ,H,D] [--window 512] [--decode-cache 65536] [--top 25]

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
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    totals = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t, n = totals.get(evt.name, (0.0, 0))
        totals[evt.name] = (t + evt.device_time, n + 1)
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    all_us = sum(t for t, _ in totals.values()) / reps
    lines = [f"  kernels: {sum(n for _, n in totals.values()) / reps:.0f} launches, {all_us:.1f} us of kernel time"]
    for name, (t, n) in rows[:top]:
        lines.append(f"  {t / reps:10.1f} us  x{n / reps:4.1f}  {name[:110]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8,4096,32,2,64", help="B,T,HQ,H,D")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--block-counts", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--decode-cache", type=int, nargs="*", default=[4096, 65536])
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_nsa needs a CUDA GPU")
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
        profile_prefill(inputs(B, T, True), bs, sc, w, args.top, f"B{B}-T{T}-HQ{HQ}-H{H}-D{D} bs{bs} S{sc}")
        torch.cuda.empty_cache()
        for S in args.decode_cache:
            profile_decode(inputs(B, S, False), bs, sc, w, args.top, f"B{B} S{S}")
            torch.cuda.empty_cache()


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
