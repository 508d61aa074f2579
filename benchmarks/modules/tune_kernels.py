"""Sweep launch configurations of the memory-bound module kernels on the current GPU (a tuning aid, not a test).

    python -m benchmarks.modules.tune_kernels [rms_norm_bwd] [conv_fwd] [conv_bwd]

For each kernel it launches the same inputs with several tile shapes / warp counts / program counts, checks that
every configuration writes the same result as the first, and prints the GPU time (do_bench median) beside the
bytes floor. The winners are what the library's launchers hard-code; rerun this when a kernel changes.
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton

from benchmarks.common import bench_ms, print_table

BANDWIDTH = 4.27e12  # H200 device-to-device copy; pass the card's own figure when comparing floors elsewhere


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tune_rms_norm_bwd():
    from fla.modules.rms_norm_kernels import _rms_norm_bwd_kernel

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, M, D, gated in (("residual D1024", 32768, 1024, False), ("gated D128", 524288, 128, True)):
        s = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        dy, dres_out = torch.randn_like(s), torch.randn_like(s)
        g = torch.randn_like(s) if gated else None
        w = torch.randn(D, device="cuda")
        rstd = torch.rand(M, device="cuda") + 0.5
        moved = s.numel() * 2 * (5 if gated else 4)  # gated: read s, dy, g, write dx, dg; else read s, dy, dres
        ref = None
        bm_choices = (2, 4, 8, 16) if D >= 1024 else (16, 32, 64)
        for bm, warps, mult, stages in itertools.product(bm_choices, (4, 8, 16), (4, 16), (1, 3)):
            if bm * D // (warps * 32) < 4:
                continue
            tiles = triton.cdiv(M, bm)
            programs = min(tiles, mult * sms)
            dx = torch.empty_like(s)
            dg = torch.empty_like(s) if gated else None
            dw = torch.empty(programs, D, device="cuda")

            def launch():
                _rms_norm_bwd_kernel[(programs,)](
                    s, w, None, g, rstd, dy, None if gated else dres_out, dx, None, dg, dw, None, M, D, programs,
                    HAS_DRES_OUT=not gated, STORE_DRES=False, HAS_WEIGHT=True, HAS_BIAS=False, HAS_GATE=gated,
                    ACTIVATION=0, BM=bm, BD=triton.next_power_of_2(D), num_warps=warps, num_stages=stages)

            try:
                ms = bench_ms(launch)
            except Exception as e:  # e.g. out of shared memory / registers for this shape
                rows.append({"kernel": f"rms_norm_bwd {name}", "config": f"BM{bm} w{warps} P{mult}xSM s{stages}",
                             "ms": None, "note": type(e).__name__})
                continue
            out = (dx, dw.sum(0)) if not gated else (dx, dg, dw.sum(0))
            if ref is None:
                ref = [o.clone() for o in out]
            err = max(_rel(o, r) for o, r in zip(out, ref))
            rows.append({"kernel": f"rms_norm_bwd {name}", "config": f"BM{bm} w{warps} P{mult}xSM s{stages}", "ms": ms,
                         "floor_ms": moved / BANDWIDTH * 1e3, "err_vs_first": err})
    return rows


def tune_conv(which):
    from fla.modules import conv_kernels as ck

    B, T, C, K = 8, 4096, 2048, 4
    x = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(C, K, device="cuda")
    dy = torch.randn_like(x)
    dz = torch.randn(B, T, C, device="cuda")
    rows, ref = [], None
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if which == "conv_fwd":
        for bt, bc, warps in itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (2, 4, 8)):
            if bt * bc < 1024 or bt * bc > 16384:
                continue
            y = torch.empty_like(x)

            def launch():
                ck._conv_fwd_kernel[(triton.cdiv(T, bt), triton.cdiv(C, bc), B)](
                    x, w, None, None, None, None, None, y, T, C, K=K, BT=bt, BC=bc, ACTIVATION=1, HAS_BIAS=False,
                    HAS_RESIDUAL=False, USE_H0=False, IS_VARLEN=False, num_warps=warps)

            ms = bench_ms(launch)
            ref = y.clone() if ref is None else ref
            rows.append({"kernel": "conv_fwd", "config": f"BT{bt} BC{bc} w{warps}", "ms": ms,
                         "floor_ms": 2 * x.numel() * 2 / BANDWIDTH * 1e3, "err_vs_first": _rel(y, ref)})
    else:
        for bt, bc, warps, mult in itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (4, 16, 64)):
            if bt * bc > 16384:
                continue
            NC, NT = triton.cdiv(C, bc), triton.cdiv(T, bt)
            programs_t = min(NT, max(1, triton.cdiv(mult * sms, B * NC)))
            tpp = triton.cdiv(NT, programs_t)
            programs_t = triton.cdiv(NT, tpp)
            dx = torch.empty_like(x)
            dw = torch.empty(B * programs_t, C, K, device="cuda")

            def launch():
                ck._conv_bwd_kernel[(programs_t, NC, B)](
                    x, None, dz, w, None, None, None, dx, dw, None, T, C, tpp,
                    K=K, BK=4, BT=bt, BC=bc, HAS_BIAS=False, USE_H0=False, HAS_DHT=False, IS_VARLEN=False,
                    num_warps=warps)

            ms = bench_ms(launch)
            out = (dx, dw.sum(0))
            ref = [o.clone() for o in out] if ref is None else ref
            rows.append({"kernel": "conv_bwd (dx, dw)", "config": f"BT{bt} BC{bc} w{warps} P{mult}xSM", "ms": ms,
                         "floor_ms": (x.numel() * 2 * 2 + dz.numel() * 4) / BANDWIDTH * 1e3,
                         "err_vs_first": max(_rel(o, r) for o, r in zip(out, ref))})
    return rows


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or ["rms_norm_bwd", "conv_fwd", "conv_bwd"]
    for name in names:
        rows = tune_rms_norm_bwd() if name == "rms_norm_bwd" else tune_conv(name)
        for kernel in dict.fromkeys(r["kernel"] for r in rows):
            sel = sorted((r for r in rows if r["kernel"] == kernel and r["ms"]), key=lambda r: r["ms"])
            print_table(sel[:8] + [r for r in rows if r["kernel"] == kernel and not r["ms"]][:3],
                        ["kernel", "config", "ms", "floor_ms", "err_vs_first"], title=f"\n{kernel}: best of {len(sel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
