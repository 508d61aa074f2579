"""Registers and spills of the attention and LTE Triton kernels for Hopper, compiled ahead of time (no GPU needed).

    python -m benchmarks.ops.kernel_resources [--arch 90] [--out DIR] [--only attn|lte|lte_router_step]

Each kernel is compiled by Triton for ``sm_<arch>`` at the launch configuration it gets from its ``launch_config``
(every dtype, head dim, GQA group, mask kind that configuration distinguishes), and the PTX is assembled by the
``ptxas`` that ships with Triton (``-v``): registers per thread and bytes spilled. A kernel that spills (local
memory traffic inside the tile loop) runs several times slower than one that does not, so every configuration in
``launch_config`` should show no or few spills here (a few hundred bytes did not hurt in the timed sweeps; tens of
kilobytes made ptxas take minutes). Prints a table and writes OUT/kernel_resources.{txt,json}; ``compile_s`` is
0 for kernels Triton's cache already held.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from typing import Dict, List

from benchmarks.common import print_table, write_json

IN_DTYPE_PTRS = {"Q", "K", "Vp", "O", "DO", "DK_out", "DV_out", "DQ"}
FP32_PTRS = {"LSE", "DELTA", "DKC", "DVC", "DSCORE"}
I32_PTRS = {"CNT", "POS", "EOS"}
SCALARS = {"qk_scale": "fp32", "scale": "fp32", "T": "i32", "WINDOW": "i32"}


def _signature(fn, dtype: str, varlen: bool):
    ptr = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[dtype]
    sig, none = {}, {}
    for name in fn.arg_names:
        if name in IN_DTYPE_PTRS:
            sig[name] = ptr
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name in I32_PTRS:
            sig[name] = "*i32"
        elif name == "SEL":
            sig[name] = "*u8"
        elif name in ("cu_seqlens", "chunk_indices"):
            sig[name] = "*i32" if varlen else "constexpr"
            if not varlen:
                none[name] = None
        elif name in SCALARS:
            sig[name] = SCALARS[name]
        else:
            sig[name] = "constexpr"
    return sig, none


def ptxas_info(ptx: str, arch: int) -> Dict[str, int]:
    """Registers and spill bytes that ptxas reports for ``ptx``."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    stores = re.search(r"(\d+) bytes spill stores", out)
    loads = re.search(r"(\d+) bytes spill loads", out)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_stores": int(stores.group(1)) if stores else 0,
            "spill_loads": int(loads.group(1)) if loads else 0}


def compile_one(fn, constexprs: Dict, dtype: str, varlen: bool, num_warps: int, num_stages: int, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, none = _signature(fn, dtype, varlen)
    values = {**none, **{k: v for k, v in constexprs.items() if k in fn.arg_names}}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in values.items()})
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return time.perf_counter() - t0, ptxas_info(kernel.asm["ptx"], arch)


def cases():
    """(op, kernel name, jit function, launch-config key, dims / group / mask / dtype choices)."""
    from fla.ops.attn import parallel_kernels as pk
    from fla.ops.lte import parallel_kernels as lk

    out = []
    for dtype in ("bf16", "fp32"):
        for D in (64, 128):
            for G in (1, 4):
                for windowed in (False, True):
                    for kernel, fn in (("fwd", pk._attn_fwd_kernel), ("dkdv", pk._attn_bwd_dkdv_kernel),
                                       ("dq", pk._attn_bwd_dq_kernel)):
                        cfg = pk.launch_config(kernel, D, D, windowed, dtype == "fp32")
                        out.append(("attn", kernel, fn, cfg, dict(D=D, G=G, windowed=windowed, dtype=dtype)))
                for kernel, fn in (("fwd", lk._lte_fwd_kernel), ("dkdv", lk._lte_bwd_dkdv_window_kernel),
                                   ("dkdv_sel", lk._lte_bwd_dkdv_selected_kernel), ("dq", lk._lte_bwd_dq_kernel)):
                    cfg = lk.launch_config(kernel, D, D, dtype == "fp32")
                    out.append(("lte", kernel, fn, cfg, dict(D=D, G=G, windowed=True, dtype=dtype)))
    return out


# (dtype, head dim, conv_size, conv_dilation, grouped by head) of the router decode step: the paper's stack at the
# 0.4B / 1.4B head sizes, a shared stack, float32, and the kernel's fewest / most convolutions
ROUTER_CASES = [("bf16", 64, [3, 3, 3], [2, 2, 2], True), ("bf16", 64, [3, 3, 3], [2, 2, 2], False),
                ("fp32", 64, [3, 3, 3], [2, 2, 2], True), ("bf16", 128, [3, 3, 3], [2, 2, 2], True),
                ("fp16", 64, [5], [1], True), ("bf16", 128, [3, 3, 3, 3], [1, 1, 2, 2], True)]


def router_step_rows(arch: int) -> List[Dict]:
    """Registers and spills of ``_lte_router_step_kernel`` (``fla.ops.lte.router_step``) at ``ROUTER_CASES``,
    with the constexprs and warps ``_lte_router_step_triton`` launches it with (16 kv heads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fla.ops.lte.router_step_kernels import _lte_router_step_kernel as fn, launch_constexprs

    rows = []
    for dtype, hd, ks, ds, grouped in ROUTER_CASES:
        constexprs, warps = launch_constexprs(16, hd, ks, ds, grouped, True, dtype == "fp32")
        ptr = "*" + dtype
        sig = {"RING": ptr, "RVALID": "*u8", "NEW_K": ptr, "NEW_V": ptr, "REAL": "*u8", "POS": "*i64",
               "SCORE": "*fp32", **{n: ptr for n in ("W0", "B0", "W1", "B1", "W2", "B2", "W3", "B3", "PW", "PB")},
               **{n: "i32" for n in ("WIN1", "stride_sb", "stride_ss", "stride_sh")},
               **{n: "constexpr" for n in constexprs}}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        t0 = time.perf_counter()
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 1})
        rows.append(dict(op="lte_router_step", kernel="step", dtype=dtype, D=hd, G=16 if grouped else 1,
                         mask=f"convs {ks} dil {ds}", config=f"w{warps}", **ptxas_info(kernel.asm["ptx"], arch),
                         compile_s=round(time.perf_counter() - t0, 2)))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability without the dot (90: Hopper)")
    parser.add_argument("--out", default="benchmarks/results/ops")
    parser.add_argument("--only", choices=["attn", "lte", "lte_router_step"], default=None,
                        help="compile one op's kernels only")
    args = parser.parse_args(argv)
    rows: List[Dict] = []
    for op, kernel, fn, (BM, BN, warps, stages), c in cases():
        if args.only not in (None, op):
            continue
        H = 2
        constexprs = dict(HQ=H * c["G"], H=H, G=c["G"], DK=c["D"], DV=c["D"], BM=BM, BN=BN, BC=BN, BK=c["D"],
                          BV=c["D"], IS_VARLEN=False, USE_WINDOW=c["windowed"],
                          PRECISION="ieee" if c["dtype"] == "fp32" else "tf32")
        seconds, info = compile_one(fn, constexprs, c["dtype"], False, warps, stages, args.arch)
        rows.append(dict(op=op, kernel=kernel, dtype=c["dtype"], D=c["D"], G=c["G"],
                         mask="window" if c["windowed"] else "full", config=f"{BM}x{BN} w{warps} s{stages}",
                         **info, compile_s=round(seconds, 2)))
        print(rows[-1], flush=True)
    if args.only in (None, "lte_router_step"):
        rows += router_step_rows(args.arch)
    cols = ["op", "kernel", "dtype", "D", "G", "mask", "config", "registers", "spill_stores", "spill_loads",
            "compile_s"]
    text = print_table(rows, cols, f"kernel_resources: sm_{args.arch}, launch_config of every case")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_resources.txt"), "w") as f:
        f.write(text)
    write_json(os.path.join(args.out, "kernel_resources.json"), {"arch": args.arch, "rows": rows})


if __name__ == "__main__":
    main()
