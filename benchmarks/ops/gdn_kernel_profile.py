"""Per-kernel GPU time of ``chunk_gated_delta_rule`` (forward, and forward+backward where it runs) from whichever
``fla`` is importable: ours in-process, or upstream fla-core in a child process (``--anchor-path``), to see which
stage of the chunked algorithm costs what beside the anchor.

Self-contained (torch, triton and that ``fla`` only) so that ``benchmarks.common.run_with_anchor`` can run it by
path; ``benchmarks.ops.tune_gdn`` prints both tables. As a script it prints one JSON line after ``RESULT_MARKER``:

    python benchmarks/ops/gdn_kernel_profile.py B,T,H,D [B,T,H,D ...]

Each table row: kernel name, calls per op call, microseconds per op call (``torch.profiler`` device time, 5 calls).
"""

from __future__ import annotations

import json
import sys
from typing import Dict, List, Tuple

RESULT_MARKER = "@@GDN_KERNEL_PROFILE@@"


def kernel_rows(fn, reps: int = 5) -> List[Dict]:
    """[{"kernel", "calls", "us"}] per call of ``fn`` (CUDA kernels only), largest first (also what
    ``benchmarks.ops.profile_ops.kernel_table`` prints)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    totals: Dict[str, Tuple[float, int]] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t, n = totals.get(evt.name, (0.0, 0))
        totals[evt.name] = (t + evt.device_time, n + 1)
    rows = [{"kernel": name, "calls": n / reps, "us": t / reps} for name, (t, n) in totals.items()]
    return sorted(rows, key=lambda r: -r["us"])


def profile_shapes(shapes: List[Tuple[int, int, int, int]]) -> List[Dict]:
    """For each (B, T, H, D): {"shape", "fwd": rows, "fwdbwd": rows or "error"} with bf16 inputs as the layer
    passes them (``use_qk_l2norm_in_kernel=True``)."""
    import torch
    import torch.nn.functional as F

    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    out = []
    for B, T, H, D in shapes:
        torch.manual_seed(0)
        dt = torch.bfloat16
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
        g = F.logsigmoid(torch.randn(B, T, H, device="cuda")).requires_grad_(True)
        beta = torch.rand(B, T, H, device="cuda", dtype=dt).requires_grad_(True)
        do = torch.randn_like(v)
        result = {"shape": f"B{B}-T{T}-H{H}-D{D}"}

        def fwd():
            return chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]

        with torch.no_grad():
            result["fwd"] = kernel_rows(fwd)
        leaves = (q, k, v, g, beta)

        def fwdbwd():
            for t in leaves:  # as do_bench's grad_to_none: no gradient accumulation kernels in the table
                t.grad = None
            fwd().backward(do)

        try:
            result["fwdbwd"] = kernel_rows(fwdbwd)
        except Exception as e:  # noqa: BLE001 - fla-core refuses its backward on Hopper with this Triton
            result["fwdbwd"] = f"{type(e).__name__}: {str(e)[:120]}"
        out.append(result)
        del q, k, v, g, beta, do
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    parsed = [tuple(int(x) for x in arg.split(",")) for arg in sys.argv[1:]]
    print(RESULT_MARKER + json.dumps(profile_shapes(parsed)))
