"""fla-core (upstream flash-linear-attention) attention and NSA as anchors, timed in a child process.

``time_jobs`` times whichever ``fla`` is importable: in the child that ``measure_anchor`` starts it is the package
in ``--anchor-path`` (fla-core 0.6.0's pure-Python wheel, unpacked), whose name collides with ours. This file is
therefore self-contained (torch, triton and that ``fla`` only) and is run by path.

A job is a dict: ``{"op": "attn", "B", "T", "HQ", "H", "D", "window"}`` (``parallel_attn``, window None = full
causal, else w keys per query as ours) or ``{"op": "nsa", "B", "T", "HQ", "H", "D", "block_size",
"block_counts"}`` (``parallel_nsa`` with ``window_size=0``: fla-core's window branch needs flash-attn). Inputs are
bf16 with gradients; each job gives ``fwd_ms`` and ``fwdbwd_ms`` (median of ``triton.testing.do_bench``), or an
``error`` string when fla-core refuses.
"""

from __future__ import annotations

import json
import sys
from typing import Dict, List

RESULT_MARKER = "@@FLA_CORE_ANCHOR_RESULT@@"


def _inputs(job: Dict, device: str = "cuda"):
    import torch

    torch.manual_seed(0)
    B, T, HQ, H, D = (job[key] for key in ("B", "T", "HQ", "H", "D"))
    dt = torch.bfloat16
    q = torch.randn(B, T, HQ, D, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(B, T, H, D, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(B, T, H, D, device=device, dtype=dt, requires_grad=True)
    leaves = [q, k, v]
    if job["op"] == "nsa":
        gates = [torch.rand(B, T, HQ, device=device, dtype=dt, requires_grad=True) for _ in range(2)]
        leaves += gates
    return leaves


def _call(job: Dict, leaves):
    if job["op"] == "attn":
        from fla.ops.attn import parallel_attn

        q, k, v = leaves
        return lambda: parallel_attn(q, k, v, window_size=job["window"])
    if job["op"] == "nsa":
        from fla.ops.nsa import parallel_nsa

        q, k, v, g_cmp, g_slc = leaves
        return lambda: parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=job["block_counts"],
                                    block_size=job["block_size"], window_size=0)
    raise ValueError(f"unknown job op {job['op']!r}; choose attn or nsa")


def time_jobs(jobs: List[Dict], warmup_ms: int = 25, rep_ms: int = 100) -> List[Dict]:
    """Time each job's forward and forward+backward with the importable ``fla``; one result dict per job."""
    import torch
    import triton.testing

    results = []
    for job in jobs:
        result = dict(job)
        try:
            leaves = _inputs(job)
            fwd = _call(job, leaves)
            do = torch.randn_like(leaves[0])
            for mode, fn in (("fwd", fwd), ("fwdbwd", lambda: fwd().backward(do))):
                fn()  # compile outside the timing
                result[f"{mode}_ms"] = float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                                     grad_to_none=leaves, return_mode="median"))
        except Exception as e:  # noqa: BLE001 - fla-core may refuse a shape; report it
            result["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        results.append(result)
        torch.cuda.empty_cache()
    return results


def measure_anchor(anchor_path: str, jobs: List[Dict], warmup_ms: int = 25, rep_ms: int = 100) -> Dict:
    """``time_jobs`` in a child process whose ``fla`` is the one in ``anchor_path``; returns {"rows", "fla_version"}."""
    from benchmarks.common import run_with_anchor

    return run_with_anchor(anchor_path, __file__, ["--worker", json.dumps(jobs), str(warmup_ms), str(rep_ms)],
                           RESULT_MARKER)


def _worker(argv: List[str]) -> int:
    rows = time_jobs(json.loads(argv[0]), int(argv[1]), int(argv[2]))
    import fla

    print(RESULT_MARKER + json.dumps({"rows": rows, "fla_version": getattr(fla, "__version__", "?"),
                                      "fla_file": fla.__file__}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("run by benchmarks.ops (python -m benchmarks.ops --anchor-path DIR), not directly")
