"""Which launch setting makes the chunked gated delta rule's Triton backward wrong on a GPU? (a diagnosis aid)

On an H200 with Triton 3.6 the bf16 case B1 T100 H2 K=V=32 (with an initial state) gave dk with relative error 0.2
while every fp32 case matched (fp32 uses exact products and one pipeline stage). This script runs that case and a
realistic one in bf16 and fp16 under several (num_warps, num_stages) settings of the per-chunk kernels and prints the
relative error of o, the final state and every gradient against the float32 torch chunk path on the same inputs:

    python -m benchmarks.ops.diagnose_gdn_gpu

A setting whose errors fall to bf16 rounding (about 5e-3) points at the miscompiled pattern; a fault that survives
every setting points at the kernel code.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import print_table
from fla.utils.testing import relative_error

CASES = [(1, 100, 2, 32, 32), (2, 1000, 4, 128, 128)]
SETTINGS = [(4, None), (4, 1), (8, None), (8, 1), (2, 1)]  # (num_warps, num_stages); None = the library's choice


def _patch(warps, stages):
    from fla.ops.gated_delta_rule import chunk_common, chunk_h, chunk_o, wy_bwd, wy_fwd

    for mod in (chunk_h, chunk_o, wy_bwd, wy_fwd):
        mod.num_warps = lambda dtype: warps
        mod.num_stages = (lambda dtype: stages) if stages is not None else chunk_common.num_stages


def _run(q, k, v, g, beta, h0, do, dht):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, g, beta, h0)]
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    o, ht = chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True,
                                   use_qk_l2norm_in_kernel=True)
    torch.autograd.backward([o, ht], [do, dht])
    return [o, ht] + [t.grad for t in leaves]


def main() -> int:
    if not torch.cuda.is_available():
        print("this diagnosis needs a CUDA GPU", file=sys.stderr)
        return 2
    names = ["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    rows = []
    for (B, T, H, K, V), dtype in itertools.product(CASES, (torch.bfloat16, torch.float16)):
        torch.manual_seed(0)
        q, k = (torch.randn(B, T, H, K, device="cuda") for _ in range(2))
        v = torch.randn(B, T, H, V, device="cuda")
        g = F.logsigmoid(torch.randn(B, T, H, device="cuda"))
        beta = torch.rand(B, T, H, device="cuda")
        h0 = torch.randn(B, H, K, V, device="cuda")
        do, dht = torch.randn(B, T, H, V, device="cuda"), torch.randn(B, H, K, V, device="cuda")
        lowp = [t.to(dtype) for t in (q, k, v, do)]
        os.environ["FLA_BACKEND"] = "torch"
        # the same rounded inputs through the float32 torch path
        ref = _run(*[t.float() for t in lowp[:3]], g, beta, h0, lowp[3].float(), dht)
        os.environ["FLA_BACKEND"] = "triton"
        for warps, stages in SETTINGS:
            _patch(warps, stages)
            try:
                out = _run(*lowp[:3], g, beta, h0, lowp[3], dht)
                errs = {n: relative_error(a.float(), b.float()) for n, a, b in zip(names, out, ref)}
            except Exception as e:  # a setting that does not compile is a finding too
                errs = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
            rows.append({"case": f"B{B} T{T} H{H} K{K} V{V} {str(dtype)[6:]}", "warps": warps,
                         "stages": stages or "lib", **errs})
            print(rows[-1], flush=True)
    print_table(rows, ["case", "warps", "stages"] + names + ["error"], title="\nrelative error vs the fp32 torch path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
