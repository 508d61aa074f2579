"""Which Triton stage of the chunked gated delta rule goes wrong in half precision on a GPU? (a diagnosis aid)

Runs the whole Triton forward + backward twice on the same inputs: once in float32 (whose cases match the torch
reference on an H200) and once in bf16 / fp16. Then every stage is re-run in isolation on the float32 pipeline's
own inputs cast to the dtypes the half-precision pipeline gave that stage, and its outputs are compared with the
float32 pipeline's outputs: a stage whose isolated relative error is far above half-precision rounding (~1e-2) is
the faulty one. Each (case, dtype) runs in its own process with CUDA_LAUNCH_BLOCKING=1, so an illegal memory access
names the kernel that made it and does not poison the next case.

    python -m benchmarks.ops.diagnose_gdn_stages
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

STAGES = ["chunk_local_cumsum", "chunk_scaled_dot_kkt_solve", "recompute_w_u", "chunk_fwd_h", "chunk_fwd_o",
          "chunk_bwd_dv_local", "chunk_bwd_dhu", "chunk_bwd_dqkwg", "wy_bwd"]
CASES = [(1, 100, 2, 32, 32), (1, 64, 1, 64, 64), (2, 1000, 4, 128, 128)]


def _record(calls):
    from fla.ops.gated_delta_rule import chunk as mod

    originals = {name: getattr(mod, name) for name in STAGES}

    def wrap(name, fn):
        def inner(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls.append((name, fn, args, kwargs, out))
            return out
        return inner

    for name, fn in originals.items():
        setattr(mod, name, wrap(name, fn))
    return originals


def _restore(originals):
    from fla.ops.gated_delta_rule import chunk as mod

    for name, fn in originals.items():
        setattr(mod, name, fn)


def _pipeline(q, k, v, g, beta, h0, do, dht):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, g, beta, h0)]
    o, ht = chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    torch.autograd.backward([o, ht], [do, dht])
    _sync()
    return [o, ht] + [t.grad for t in leaves]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flat(item)]
    return []


def _cast_like(x, ref):
    if isinstance(x, torch.Tensor) and isinstance(ref, torch.Tensor) and x.is_floating_point():
        return x.to(ref.dtype)
    return x


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def child(case_idx: int, dtype_name: str) -> None:
    os.environ["FLA_BACKEND"] = "triton"
    B, T, H, K, V = CASES[case_idx]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = (F.normalize(torch.randn(B, T, H, K, device=dev), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, V, device=dev)
    g = F.logsigmoid(torch.randn(B, T, H, device=dev))
    beta = torch.rand(B, T, H, device=dev)
    h0 = torch.randn(B, H, K, V, device=dev)
    do, dht = torch.randn(B, T, H, V, device=dev), torch.randn(B, H, K, V, device=dev)
    low = [t.to(dtype) for t in (q, k, v, do)]
    up = [t.float() for t in low]

    calls32, calls16 = [], []
    orig = _record(calls32)
    out32 = _pipeline(*up[:3], g, beta, h0, up[3], dht)
    _restore(orig)
    orig = _record(calls16)
    out16 = _pipeline(*low[:3], g, beta, h0, low[3], dht)
    _restore(orig)
    names = ["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    result = {"case": f"B{B} T{T} H{H} K{K} V{V} {dtype_name}",
              "end_to_end": {n: round(_rel(a, b), 5) for n, a, b in zip(names, out16, out32)}, "stages": {}}
    for (name, fn, args32, kw32, res32), (_, _, args16, kw16, _) in zip(calls32, calls16):
        args = [_cast_like(a, b) for a, b in zip(args32, args16)]
        kw = {key: _cast_like(val, kw16.get(key)) for key, val in kw32.items()}
        res = fn(*args, **kw)
        _sync()
        errs = [round(_rel(a, b), 5) for a, b in zip(_flat(res), _flat(res32))]
        result["stages"].setdefault(name, []).append(errs)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("this diagnosis needs a CUDA GPU", file=sys.stderr)
        return 2
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for i in range(len(CASES)):
        for dtype_name in ("bfloat16", "float16"):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.ops.diagnose_gdn_stages", "--child", str(i),
                                   dtype_name], env=env, capture_output=True, text=True, timeout=300)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                res = json.loads(lines[-1][7:])
                print(res["case"], "end-to-end:", res["end_to_end"])
                for name, errs in res["stages"].items():
                    print(f"   {name:28s} {errs}")
            else:
                print(CASES[i], dtype_name, "FAILED rc", proc.returncode)
                print("\n".join(proc.stderr.splitlines()[-25:]))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    sys.exit(main())
