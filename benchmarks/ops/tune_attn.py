"""Tile / warp / stage sweep of the attention and LTE training kernels on one CUDA GPU (a tuning aid).

    python -m benchmarks.ops.tune_attn [--out DIR] [--rep-ms 30] [--only attn,lte] [--shape 8,4096,16,16,64]
                                       [--kernels fwd,dkdv,dkdv_sel,dq] [--masks full,window]

For each kernel (attention: fwd, dkdv, dq; LTE: fwd, dkdv, dkdv_sel, dq) and each candidate
(BM, BN, num_warps, num_stages), with every other kernel at its current ``launch_config``:
    - correctness: forward output and gradients against the same op at the default configuration (relative error
      ||x - ref|| / ||ref||; a candidate above 1e-2 is marked BAD and never ranked);
    - time: median of ``triton.testing.do_bench`` of the whole forward (fwd candidates) or the whole backward
      (backward candidates), bf16, B8-T4096-H16-D64, full causal and sliding window 768 (attention), w = 768 with
      12.5% selected (LTE).
The table lists the time of each candidate and its ratio to the default, per kernel and mask; OUT/tune_attn.json
holds the rows. Torch SDPA (full) and FlexAttention (window) times of the same shapes sit in the header.
Choosing the defaults from it is a human decision (written into ``launch_config``); nothing here changes them.
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import bench_ms, device_name, print_table, write_json

SHAPE = (8, 4096, 16, 16, 64)
WINDOW = 768
CANDIDATES = {
    "fwd": [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3),
            (64, 128, 4, 3), (128, 64, 8, 4)],
    "dkdv": [(64, 64, 8, 1), (64, 64, 4, 2), (64, 64, 8, 2), (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2),
             (32, 64, 4, 3), (64, 128, 4, 3), (16, 128, 4, 3), (32, 64, 4, 2), (64, 64, 4, 3)],
    "dq": [(64, 64, 8, 1), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3),
           (128, 32, 8, 3), (128, 64, 4, 3)],
    "dkdv_sel": [(64, 64, 8, 1), (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2), (32, 64, 4, 3)],
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _inputs(shape, seed: int = 0):
    B, T, HQ, H, D = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, device="cuda", generator=g, dtype=torch.bfloat16) for h in (HQ, H, H))
    do = torch.randn(B, T, HQ, D, device="cuda", generator=g, dtype=torch.bfloat16)
    return q, k, v, do


def attn_rows(rep_ms: int, shape=SHAPE, kernels=("fwd", "dkdv", "dq"), masks=("full", "window")):
    from fla.ops.attn import parallel_kernels as pk

    q, k, v, do = _inputs(shape)
    scale = q.shape[-1] ** -0.5
    rows = []
    for window in [None if m == "full" else WINDOW for m in masks]:
        mask = "full" if window is None else f"window {window}"
        o0, lse0 = pk.attn_fwd(q, k, v, scale, window, None)
        g0 = pk.attn_bwd(q, k, v, o0, lse0, do, scale, window, None)
        base = {}
        for kernel in [k for k in ("fwd", "dkdv", "dq") if k in kernels]:
            for cfg in CANDIDATES[kernel]:
                try:
                    if kernel == "fwd":
                        o, _ = pk.attn_fwd(q, k, v, scale, window, None, config=cfg)
                        err = _rel(o, o0)
                        ms = bench_ms(lambda: pk.attn_fwd(q, k, v, scale, window, None, config=cfg), rep_ms=rep_ms)
                    else:
                        kw = {f"{kernel}_config": cfg}
                        g = pk.attn_bwd(q, k, v, o0, lse0, do, scale, window, None, **kw)
                        err = max(_rel(a, b) for a, b in zip(g, g0))
                        ms = bench_ms(lambda: pk.attn_bwd(q, k, v, o0, lse0, do, scale, window, None, **kw),
                                      rep_ms=rep_ms)
                except Exception as e:  # a candidate that does not compile (shared memory) is reported, not fatal
                    rows.append(dict(op="attn", mask=mask, kernel=kernel, config=str(cfg), ms=None, err=None,
                                     note=type(e).__name__))
                    print(f"attn {mask} {kernel} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                base.setdefault(kernel, ms)
                rows.append(dict(op="attn", mask=mask, kernel=kernel, config=str(cfg), ms=ms, err=err,
                                 ratio=ms / base[kernel], note="BAD" if err > 1e-2 else ""))
                print(f"attn {mask} {kernel} {cfg}: {ms:.3f} ms err {err:.1e}", flush=True)
    return rows


def lte_rows(rep_ms: int, shape=SHAPE, kernels=("fwd", "dkdv", "dkdv_sel", "dq")):
    from fla.ops.lte import parallel_kernels as lk

    q, k, v, do = _inputs(shape, 1)
    B, T, HQ, H, D = shape
    g = torch.Generator(device="cuda").manual_seed(2)
    selected = torch.rand(B, T, H, device="cuda", generator=g) < 0.125
    selected[:, :4] = True
    index = lk.build_selected_index(selected, None)
    scale = D ** -0.5
    default = lk.launch_config
    o0, lse0 = lk.lte_fwd(q, k, v, index, scale, WINDOW, None)
    g0 = lk.lte_bwd(q, k, v, o0, lse0, do, index, scale, WINDOW, None)
    rows = []
    base = {}
    try:
        for kernel in [k for k in ("fwd", "dkdv", "dkdv_sel", "dq") if k in kernels]:
            for cfg in CANDIDATES[kernel]:
                lk.launch_config = lambda stage, DK, DV, fp32=False, _k=kernel, _c=cfg: \
                    _c if stage == _k else default(stage, DK, DV, fp32)
                try:
                    if kernel == "fwd":
                        o, _ = lk.lte_fwd(q, k, v, index, scale, WINDOW, None)
                        err = _rel(o, o0)
                        ms = bench_ms(lambda: lk.lte_fwd(q, k, v, index, scale, WINDOW, None), rep_ms=rep_ms)
                    else:
                        gr = lk.lte_bwd(q, k, v, o0, lse0, do, index, scale, WINDOW, None)
                        err = max(_rel(a, b) for a, b in zip(gr, g0))
                        ms = bench_ms(lambda: lk.lte_bwd(q, k, v, o0, lse0, do, index, scale, WINDOW, None),
                                      rep_ms=rep_ms)
                except Exception as e:
                    rows.append(dict(op="lte", mask=f"w {WINDOW} + 12.5%", kernel=kernel, config=str(cfg), ms=None,
                                     err=None, note=type(e).__name__))
                    print(f"lte {kernel} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                base.setdefault(kernel, ms)
                rows.append(dict(op="lte", mask=f"w {WINDOW} + 12.5%", kernel=kernel, config=str(cfg), ms=ms,
                                 err=err, ratio=ms / base[kernel], note="BAD" if err > 1e-2 else ""))
                print(f"lte {kernel} {cfg}: {ms:.3f} ms err {err:.1e}", flush=True)
    finally:
        lk.launch_config = default
    return rows


def anchors(rep_ms: int, shape=SHAPE):
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, do = _inputs(shape)
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    gqa = qt.shape[1] != kt.shape[1]
    out = {}
    out["sdpa fwd"] = bench_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa),
                               rep_ms=rep_ms)
    o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    out["sdpa bwd"] = bench_ms(lambda: torch.autograd.grad(o, (qt, kt, vt), do.transpose(1, 2), retain_graph=True),
                               rep_ms=rep_ms)
    B, T, HQ = q.shape[0], q.shape[1], q.shape[2]
    bm = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < WINDOW), B, HQ, T, T, device="cuda")
    flex = torch.compile(flex_attention)
    out["flex fwd"] = bench_ms(lambda: flex(qt, kt, vt, block_mask=bm, enable_gqa=gqa), rep_ms=rep_ms)
    of = flex(qt, kt, vt, block_mask=bm, enable_gqa=gqa)
    out["flex bwd"] = bench_ms(lambda: torch.autograd.grad(of, (qt, kt, vt), do.transpose(1, 2), retain_graph=True),
                               rep_ms=rep_ms)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/ops")
    parser.add_argument("--rep-ms", type=int, default=30)
    parser.add_argument("--only", default="attn,lte", help="comma list of attn, lte")
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)), help="B,T,HQ,H,D")
    parser.add_argument("--kernels", default="fwd,dkdv,dkdv_sel,dq", help="comma list of kernels to sweep")
    parser.add_argument("--masks", default="full,window", help="attention masks: comma list of full, window")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_attn needs a CUDA GPU")
    only = set(args.only.split(","))
    shape = tuple(int(x) for x in args.shape.split(","))
    if len(shape) != 5 or shape[2] % shape[3]:
        parser.error(f"--shape must be B,T,HQ,H,D with HQ a multiple of H, got {args.shape!r}")
    kernels = tuple(args.kernels.split(","))
    unknown = set(kernels) - set(CANDIDATES) | set(args.masks.split(",")) - {"full", "window"}
    if unknown:
        parser.error(f"unknown kernels / masks {sorted(unknown)}; kernels: {sorted(CANDIDATES)}, masks: full, window")
    head = anchors(args.rep_ms, shape)
    print("anchors (ms):", {k: round(v, 3) for k, v in head.items()}, flush=True)
    rows = (attn_rows(args.rep_ms, shape, kernels, tuple(args.masks.split(","))) if "attn" in only else []) + \
        (lte_rows(args.rep_ms, shape, kernels) if "lte" in only else [])
    title = f"tune_attn: {device_name()} | B-T-HQ-H-D {'-'.join(map(str, shape))} | anchors (ms) " + \
        ", ".join(f"{k} {v:.3f}" for k, v in head.items())
    cols = ["op", "mask", "kernel", "config", "ms", "ratio", "err", "note"]
    text = print_table(rows, cols, title)
    os.makedirs(args.out, exist_ok=True)
    name = "tune_attn" if shape == SHAPE else "tune_attn_" + "-".join(map(str, shape))
    with open(os.path.join(args.out, name + ".txt"), "w") as f:
        f.write(text)
    write_json(os.path.join(args.out, name + ".json"), {"shape": shape, "anchors": head, "rows": rows})


if __name__ == "__main__":
    main()
