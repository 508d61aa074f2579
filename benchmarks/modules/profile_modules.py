"""Kernel-level profile of one forward+backward of chosen module benchmark cases (CUDA), to see where time goes.

    python -m benchmarks.modules.profile_modules rotary l2norm [--backend triton|torch] [--quick]

Prints torch.profiler's table of CUDA kernels (self time, calls) for each case after a warm-up step.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import backend
from benchmarks.modules.benchmark_modules import _as_list, cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="case names as printed by benchmark_modules")
    parser.add_argument("--backend", default="triton", choices=["triton", "torch"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("this profile needs a CUDA GPU", file=sys.stderr)
        return 2
    by_name = {c.name: c for c in cases(args.quick)}
    for name in args.names:
        if name not in by_name:
            print(f"unknown case {name!r}; known: {', '.join(by_name)}", file=sys.stderr)
            return 2
        fn, leaves = by_name[name].setup()
        with backend(args.backend):
            dy = [torch.randn_like(t) for t in _as_list(fn())]

            def step():
                for t in leaves:
                    t.grad = None
                torch.autograd.backward(_as_list(fn()), dy)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
        print(f"\n== {name} ({args.backend}), 5 x fwd+bwd")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
