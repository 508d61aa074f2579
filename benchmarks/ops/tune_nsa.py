"""Launch-setting sweep of NSA's selected-attention kernels (forward, dq, dk/dv) on the GPU.

    python -m benchmarks.ops.tune_nsa [--shape B,T,HQ,H,D] [--block-size 64] [--block-counts 16]

Inputs are random bf16 with the block selection of ``parallel_nsa`` (the compressed ranking and top-k), so the
key-block popularity that drives the dk/dv kernel's balance is the real one. Prints ms per kernel launch for each
setting (``triton.testing.do_bench`` median) with the current default marked; the defaults live in
``fla.ops.nsa.parallel_kernels`` (FWD_LAUNCH, DQ_LAUNCH, DKDV_LAUNCH). CUDA only.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import bench_ms

FWD = [(2, 2), (2, 3), (2, 1), (1, 2), (4, 2)]
DQ = [(2, 2), (2, 3), (2, 1), (1, 2), (4, 2)]
DKDV = [(4, 1, 4), (4, 2, 4), (2, 1, 4), (4, 1, 8), (8, 1, 8), (4, 1, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8,4096,32,2,64", help="B,T,HQ,H,D")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--block-counts", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_nsa needs a CUDA GPU")
    from fla.ops.nsa import parallel_kernels as pk
    from fla.ops.nsa.compression import mean_pool_blocks
    from fla.ops.nsa.compression_kernels import block_importance, cmp_fwd, top_blocks

    B, T, HQ, H, D = (int(x) for x in args.shape.split(","))
    bs, sc = args.block_size, args.block_counts
    scale = D ** -0.5
    torch.manual_seed(0)
    q = torch.randn(B, T, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(q)
    gate = torch.rand(B, T, HQ, device="cuda", dtype=torch.bfloat16)
    k_cmp = mean_pool_blocks(k.float(), bs).to(k.dtype)
    v_cmp = mean_pool_blocks(v.float(), bs).to(v.dtype)
    _, lse_cmp = cmp_fwd(q, k_cmp, v_cmp, T, bs, scale)
    bi = top_blocks(block_importance(q, k_cmp, lse_cmp, T, bs, scale), sc).to(torch.int32).contiguous()
    o, lse, _ = pk.slc_fwd(q, k, v, bi, bs, scale)
    delta = (o.float() * do.float() * gate.float()[..., None]).sum(-1).contiguous()
    print(f"NSA selected attention, B{B}-T{T}-HQ{HQ}-H{H}-D{D} bs{bs} S{sc}, bf16, "
          f"{torch.cuda.get_device_name()} (ms; * = default)")
    for cfg in FWD:
        ms = bench_ms(lambda: pk.slc_fwd(q, k, v, bi, bs, scale, launch=cfg))
        print(f"  fwd   warps/stages {cfg}: {ms:.3f}{' *' if cfg == pk.FWD_LAUNCH else ''}", flush=True)
    # dq alone: dk/dv with its default each time, timed together, minus dk/dv alone below
    for cfg in DQ:
        ms = bench_ms(lambda: pk.slc_bwd(q, k, v, o, lse, do, bi, bs, scale, gate=gate, delta=delta, dq_launch=cfg))
        print(f"  bwd   dq warps/stages {cfg}: {ms:.3f}{' *' if cfg == pk.DQ_LAUNCH else ''}", flush=True)
    for cfg in DKDV:
        ms = bench_ms(lambda: pk.slc_bwd(q, k, v, o, lse, do, bi, bs, scale, gate=gate, delta=delta,
                                         dkdv_launch=cfg))
        print(f"  bwd   dkdv warps/stages/BM {cfg}: {ms:.3f}{' *' if cfg[:2] == pk.DKDV_LAUNCH[:2] else ''}",
              flush=True)


if __name__ == "__main__":
    main()
