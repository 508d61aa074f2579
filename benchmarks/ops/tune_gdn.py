"""Where the chunked gated delta rule spends its time, and a launch-configuration sweep of its kernels (CUDA).

    python -m benchmarks.ops.tune_gdn [--out DIR] [--anchor-path DIR] [--shapes 8,4096,8,128 ...]
                                      [--stages fwd_h,fwd_o,...] [--rep-ms 30] [--no-sweep] [--no-profile]
                                      [--segments]

1. Kernel tables (``gdn_kernel_profile``): our forward and forward+backward per kernel, and fla-core's forward
   beside it when ``--anchor-path`` holds it (timed in a child process, as in ``benchmarks.ops``).
2. Sweep: each stage of our Triton pipeline (``STAGES``) run alone on the inputs a real forward / backward gave it,
   with every candidate launch configuration; each candidate's outputs are compared with the default's (relative
   error ||x - ref|| / ||ref||; above 1e-2 the row has ok False) and timed (median of ``do_bench``).
3. ``--segments``: for shapes whose state recurrences are cut into segments (``chunk_h.num_segments``), both
   recurrences walked whole against in segments.

Choosing new defaults from it is a human decision (written into ``chunk_h._state_launch`` / ``chunk_common``);
nothing here changes them. Writes OUT/tune_gdn.{txt,json} (default OUT: benchmarks/results/ops).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Dict, List

import torch
import triton

from benchmarks.common import bench_ms, device_name, print_table, run_with_anchor, write_json

SHAPES = [(8, 4096, 8, 128), (4, 4096, 8, 256), (1, 32768, 8, 128)]
# (BV, num_warps, num_stages) of the state recurrences; (block, num_warps, num_stages) of the per-chunk kernels.
# A short list around the defaults, chosen from ptxas' spill report (benchmarks/ops/kernel_resources.py): every
# candidate costs a compile.
STATE_CANDIDATES = [(32, 4, 2), (64, 4, 2), (16, 4, 2), (16, 8, 1), (32, 8, 1), (64, 8, 1), (32, 8, 2), (64, 8, 2)]
CHUNK_CANDIDATES = [(64, 4, 2), (32, 4, 2), (64, 8, 1), (64, 8, 2), (128, 8, 2), (32, 8, 2)]
WY_CANDIDATES = [(64, 4, 2), (32, 4, 2), (32, 2, 2), (64, 2, 2), (32, 8, 2), (64, 8, 2), (32, 4, 1)]
WY_BWD_CANDIDATES = [(64, 2, 2), (32, 2, 2), (32, 8, 2), (32, 8, 1), (64, 8, 2)]  # never 4 warps (FLA #984)
STAGES = ["kkt_solve", "w_u", "fwd_h", "fwd_o", "dv_local", "bwd_dhu", "dqkwg", "wy_bwd"]


@contextlib.contextmanager
def patched(module, **attrs):
    old = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def stage_inputs(B: int, T: int, H: int, D: int) -> Dict:
    """Every intermediate of one Triton forward + backward (bf16), as each stage's inputs."""
    import torch.nn.functional as F

    from fla.ops.gated_delta_rule import chunk_h, chunk_o, wy_bwd, wy_fwd
    from fla.ops.gated_delta_rule.chunk_common import make_chunking
    from fla.ops.utils.cumsum import chunk_local_cumsum
    from fla.ops.utils.l2norm import l2norm

    torch.manual_seed(0)
    dt = torch.bfloat16
    q, k = (l2norm(torch.randn(B, T, H, D, device="cuda", dtype=dt)) for _ in range(2))
    v = torch.randn(B, T, H, D, device="cuda", dtype=dt)
    beta = torch.rand(B, T, H, device="cuda", dtype=dt)
    c = make_chunking(B, T, None)
    g = chunk_local_cumsum(F.logsigmoid(torch.randn(B, T, H, device="cuda")), c.chunk_size)
    do = torch.randn_like(v)
    scale = D ** -0.5
    ai = wy_fwd.chunk_scaled_dot_kkt_solve(k, g, beta, c)
    w, u = wy_fwd.recompute_w_u(k, v, g, beta, ai, c)
    h, v_new, _ = chunk_h.chunk_fwd_h(k, w, u, g, None, False, c)
    dv_local = chunk_o.chunk_bwd_dv_local(q, k, g, do, scale, c)
    dh, dv_new, _ = chunk_h.chunk_bwd_dhu(q, k, w, g, do, dv_local, None, False, scale, c)
    dq, dk_qo, dw, dg_qo = chunk_o.chunk_bwd_dqkwg(q, k, v_new, h, g, do, dh, dv_new, scale, c)
    x = dict(q=q, k=k, v=v, beta=beta, g=g, do=do, scale=scale, c=c, ai=ai, w=w, u=u, h=h, v_new=v_new,
             dv_local=dv_local, dh=dh, dv_new=dv_new, dw=dw, dk_qo=dk_qo, dg_qo=dg_qo)
    calls = {
        "kkt_solve": (wy_fwd, lambda: wy_fwd.chunk_scaled_dot_kkt_solve(k, g, beta, c)),
        "w_u": (wy_fwd, lambda: wy_fwd.recompute_w_u(k, v, g, beta, ai, c)),
        "fwd_h": (chunk_h, lambda: chunk_h.chunk_fwd_h(k, w, u, g, None, False, c)[:2]),
        "fwd_o": (chunk_o, lambda: chunk_o.chunk_fwd_o(q, k, v_new, h, g, scale, c, output_dtype=dt)),
        "dv_local": (chunk_o, lambda: chunk_o.chunk_bwd_dv_local(q, k, g, do, scale, c)),
        "bwd_dhu": (chunk_h, lambda: chunk_h.chunk_bwd_dhu(q, k, w, g, do, dv_local, None, False, scale, c)[:2]),
        "dqkwg": (chunk_o, lambda: chunk_o.chunk_bwd_dqkwg(q, k, v_new, h, g, do, dh, dv_new, scale, c)),
        "wy_bwd": (wy_bwd, lambda: wy_bwd.wy_bwd(k, v, g, beta, ai, w, u, dw, dv_new, dk_qo, dg_qo, c)),
    }
    x["calls"] = calls
    return x


def _as_list(out) -> List[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def candidates_for(stage: str, D: int):
    """(label, module attribute patches) per candidate of ``stage`` at head size D; the first is the default."""
    BK = max(16, triton.next_power_of_2(D))
    out = [("default", {})]
    if stage in ("fwd_h", "bwd_dhu"):
        for bv, w, s in STATE_CANDIDATES:
            if bv <= D:
                launch = (BK, bv, {"num_warps": w, "num_stages": s})
                out.append((f"BV{bv} w{w} s{s}", {"_state_launch": (lambda *a, launch=launch, **kw: launch)}))
        return out
    table = {"kkt_solve": WY_CANDIDATES, "w_u": WY_CANDIDATES, "wy_bwd": WY_BWD_CANDIDATES}.get(stage, CHUNK_CANDIDATES)
    for b, w, s in table:
        if b <= max(D, 32):
            launch = (b, {"num_warps": w, "num_stages": s})
            out.append((f"B{b} w{w} s{s}", {"chunk_launch": (lambda kernel, dtype, *a, launch=launch: launch)}))
    return out


def sweep(shapes, stages, rep_ms: int) -> List[Dict]:
    rows = []
    for B, T, H, D in shapes:
        x = stage_inputs(B, T, H, D)
        shape = f"B{B}-T{T}-H{H}-D{D}"
        for stage in stages:
            module, call = x["calls"][stage]
            ref = [t.clone() for t in _as_list(call())]
            base = None
            for label, patch in candidates_for(stage, D):
                row = {"shape": shape, "stage": stage, "config": label}
                try:
                    with patched(module, **patch):
                        got = _as_list(call())
                        err = max(_rel(a, b) for a, b in zip(got, ref))
                        ms = bench_ms(call, rep_ms=rep_ms)
                    row.update(ms=ms, err=err, ok=err < 1e-2)
                    base = ms if label == "default" else base
                    row["vs_default"] = ms / base if base else None
                except Exception as e:  # noqa: BLE001 - a candidate may not fit shared memory; report it
                    row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                rows.append(row)
                print(f"  {shape} {stage} {label}: " + (f"{row['ms']:.4f} ms err {row['err']:.1e}" if "ms" in row
                                                       else row["error"]), flush=True)
            good = [r for r in rows if r["shape"] == shape and r["stage"] == stage and r.get("ok")]
            if good and base:
                best = min(good, key=lambda r: r["ms"])
                print(f"{shape} {stage}: default {base:.4f} ms, best {best['config']} {best['ms']:.4f} ms",
                      flush=True)
        del x
        torch.cuda.empty_cache()
    return rows


def segment_rows(shapes, rep_ms: int) -> List[Dict]:
    """The state recurrences walked whole (segments=1) against cut into ``num_segments`` segments, where that
    count is above 1: forward ``chunk_fwd_h`` and backward ``chunk_bwd_dhu``, ms and the relative difference."""
    from fla.ops.gated_delta_rule import chunk_h

    rows = []
    for B, T, H, D in shapes:
        S = chunk_h.num_segments(B * H, triton.cdiv(T, 64), False)
        if S == 1:
            continue
        x = stage_inputs(B, T, H, D)
        q, k, w, u, g, c = (x[n] for n in ("q", "k", "w", "u", "g", "c"))
        do, dv_local, scale = x["do"], x["dv_local"], x["scale"]
        for name, call in (("fwd_h", lambda n: chunk_h.chunk_fwd_h(k, w, u, g, None, True, c, segments=n)),
                           ("bwd_dhu", lambda n: chunk_h.chunk_bwd_dhu(q, k, w, g, do, dv_local, None, True, scale,
                                                                       c, segments=n))):
            whole, cut = call(1), call(None)
            err = max(_rel(a, b) for a, b in zip(cut, whole))
            ms = {n: bench_ms(lambda n=n: call(n), rep_ms=rep_ms) for n in (1, None)}
            rows.append({"shape": f"B{B}-T{T}-H{H}-D{D}", "stage": name, "segments": S, "whole_ms": ms[1],
                         "segmented_ms": ms[None], "speedup": ms[1] / ms[None], "err": err})
            print(rows[-1], flush=True)
        del x
        torch.cuda.empty_cache()
    return rows


def _table(title: str, rows: List[Dict], top: int = 14) -> str:
    lines = [title]
    for r in rows[:top]:
        lines.append(f"  {r['us']:9.1f} us  x{r['calls']:4.1f}  {r['kernel'][:90]}")
    lines.append(f"  {sum(r['us'] for r in rows):9.1f} us  total over {sum(r['calls'] for r in rows):.0f} launches")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/ops")
    parser.add_argument("--anchor-path", default=None, help="folder holding fla-core's fla package")
    parser.add_argument("--shapes", nargs="*", default=[",".join(map(str, s)) for s in SHAPES], help="B,T,H,D")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--rep-ms", type=int, default=30)
    parser.add_argument("--no-sweep", action="store_true", help="only the kernel tables")
    parser.add_argument("--no-profile", action="store_true", help="no kernel tables")
    parser.add_argument("--segments", action="store_true",
                        help="also time the state recurrences whole against cut into segments (shapes that cut)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_gdn needs a CUDA GPU")
    os.environ["FLA_BACKEND"] = "triton"
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {STAGES}")

    from benchmarks.ops import gdn_kernel_profile

    text = [f"# tune_gdn on {device_name()}, torch {torch.__version__}, triton {triton.__version__}"]
    ours = [] if args.no_profile else gdn_kernel_profile.profile_shapes(shapes)
    anchor = None
    if args.anchor_path and not args.no_profile:
        try:
            anchor = run_with_anchor(args.anchor_path, gdn_kernel_profile.__file__,
                                     [",".join(map(str, s)) for s in shapes], gdn_kernel_profile.RESULT_MARKER)
        except RuntimeError as e:
            text.append(f"fla-core profile failed: {str(e)[-400:]}")
    for i, res in enumerate(ours):
        text.append(_table(f"\n## ours {res['shape']} fwd", res["fwd"]))
        if anchor:
            text.append(_table(f"## fla-core {res['shape']} fwd", anchor[i]["fwd"]))
        if isinstance(res["fwdbwd"], list):
            text.append(_table(f"## ours {res['shape']} fwd+bwd", res["fwdbwd"], top=20))
    print("\n".join(text), flush=True)
    seg_rows = segment_rows(shapes, args.rep_ms) if args.segments else []
    if seg_rows:
        text.append(print_table(seg_rows, list(seg_rows[0]), title="\n## state recurrences whole vs in segments"))
    rows = [] if args.no_sweep else sweep(shapes, stages, args.rep_ms)
    if rows:
        text.append(print_table(rows, ["shape", "stage", "config", "ms", "vs_default", "err", "ok", "error"],
                                title="\n## launch sweep (each stage alone)"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_gdn.txt"), "w") as f:
        f.write("\n".join(text) + "\n")
    write_json(os.path.join(args.out, "tune_gdn.json"), {"device": device_name(), "ours": ours, "anchor": anchor,
                                                          "segments": seg_rows, "sweep": rows})


if __name__ == "__main__":
    main()
