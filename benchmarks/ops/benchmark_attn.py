"""Causal softmax attention on one CUDA GPU: ours (Triton, FLA_BACKEND=triton) vs torch SDPA and FlexAttention.

    python -m benchmarks.ops.benchmark_attn [--out DIR] [--quick] [--no-flex]

Prefill (bf16, inputs needing gradients; median of triton.testing.do_bench), fwd and fwd+bwd:
    shapes B-T-HQ-H-D: 8-4096-16-16-64, 2-16384-16-16-64, 8-4096-32-8-64; windows None / 768 / 1024.
    - ours: ``parallel_attn`` with FLA_BACKEND=triton (the Triton kernels are opt-in until validated on the GPU);
    - sdpa: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=...)``, full causal only (a window would need a
      dense [T, T] mask, which is not the fast path);
    - flex: ``torch.nn.attention.flex_attention`` compiled, with a causal (sliding-window) block mask built once per
      shape.
Decoding (bf16, B = 8, HQ = 16, H = 16 and HQ = 32, H = 8, D = 64): ``attn_decoding_one_step`` (Triton) vs SDPA of
    one query against the whole cache (no mask), at cache lengths 4K / 16K / 64K.

Prints tables with ours/other ratios (below 1: ours is faster) and writes OUT/attn.{txt,json}
(default OUT: benchmarks/results). Nothing here asserts a speed.

``bench_prefill`` / ``bench_decode`` also take ``device="cpu"`` (float32, our torch path, a wall-clock ``timer``)
for the CPU smoke run of ``python -m benchmarks.ops --quick``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from benchmarks.common import backend, bench_ms, device_name, graph_ms, print_table, write_json

SHAPES = [(8, 4096, 16, 16, 64), (2, 16384, 16, 16, 64), (8, 4096, 32, 8, 64)]
QUICK_SHAPES = [(2, 2048, 16, 16, 64), (2, 2048, 32, 8, 64)]
WINDOWS = [None, 768, 1024]
DECODE_CACHES = [4096, 16384, 65536]
DECODE_HEADS = [(16, 16, 64), (32, 8, 64)]


def _ours_backend(device: str) -> str:
    # our Triton kernels on CUDA (some are opt-in until validated on the GPU), our torch path elsewhere
    return "triton" if torch.device(device).type == "cuda" else "torch"


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _flex_fn(B, T, HQ, H, window, device="cuda"):
    """A compiled FlexAttention call with its block mask built once; None when unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        if window is None:
            return causal
        return causal & (q_idx - kv_idx < window)

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):  # [B, T, H, D] in, [B, T, HQ, D] out
        o = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                     enable_gqa=HQ != H)
        return o.transpose(1, 2)

    return run


def _sdpa(q, k, v, HQ, H):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=HQ != H)
    return o.transpose(1, 2)


def _bench_prefill_shape(B, T, HQ, H, D, windows, use_flex, device="cuda", timer=bench_ms):
    from fla.ops.attn import parallel_attn

    torch.manual_seed(0)
    dt = _dtype(device)
    q = torch.randn(B, T, HQ, D, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(B, T, H, D, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(B, T, H, D, device=device, dtype=dt, requires_grad=True)
    do = torch.randn(B, T, HQ, D, device=device, dtype=dt)
    leaves = [q, k, v]
    rows = []
    for window in windows:
        impls = {"ours": lambda window=window: parallel_attn(q, k, v, window_size=window)}
        if window is None:
            impls["sdpa"] = lambda: _sdpa(q, k, v, HQ, H)
        if use_flex:
            flex = _flex_fn(B, T, HQ, H, window, device)
            if flex is not None:
                impls["flex"] = lambda flex=flex: flex(q, k, v)
        for mode in ("fwd", "fwdbwd"):
            row = {"shape": f"B{B}-T{T}-HQ{HQ}-H{H}-D{D}", "window": window, "mode": mode}
            for name, fn in impls.items():
                call = fn if mode == "fwd" else (lambda fn=fn: fn().backward(do))
                try:
                    with backend(_ours_backend(device)):
                        row[name] = timer(call, grad_to_none=leaves)
                except Exception as e:  # a failing baseline should not hide the others
                    row[name] = None
                    row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
            for other in ("sdpa", "flex"):
                if row.get("ours") and row.get(other):
                    row[f"ours/{other}"] = row["ours"] / row[other]
            rows.append(row)
            print(row, flush=True)
    return rows


def bench_prefill(shapes, windows, use_flex=True, device="cuda", timer=bench_ms):
    rows = []
    for B, T, HQ, H, D in shapes:
        rows += _bench_prefill_shape(B, T, HQ, H, D, windows, use_flex, device, timer)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _bench_decode_shape(B, S, HQ, H, D, device="cuda", timer=bench_ms):
    from fla.ops.attn import attn_decoding_one_step

    torch.manual_seed(0)
    dt = _dtype(device)
    q = torch.randn(B, 1, HQ, D, device=device, dtype=dt)
    k = torch.randn(B, S, H, D, device=device, dtype=dt)
    v = torch.randn(B, S, H, D, device=device, dtype=dt)
    row = {"shape": f"B{B}-S{S}-HQ{HQ}-H{H}-D{D}"}
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    fns = {"ours": lambda: attn_decoding_one_step(q, k, v),
           "ours_w1024": lambda: attn_decoding_one_step(q, k, v, window_size=1024),
           "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=HQ != H)}
    with backend(_ours_backend(device)):
        for name, fn in fns.items():
            row[name] = timer(fn)
            if device == "cuda":  # replayed as a CUDA graph: the kernels without Python and launch latency
                row[f"{name}_graph"] = graph_ms(fn)
    row["ours/sdpa"] = row["ours"] / row["sdpa"]
    row["ours_GB/s"] = 2 * B * S * H * D * dt.itemsize / row["ours"] / 1e6  # k and v read once
    print(row, flush=True)
    return row


def bench_decode(caches, heads, B=8, device="cuda", timer=bench_ms):
    rows = []
    for HQ, H, D in heads:
        for S in caches:
            rows.append(_bench_decode_shape(B, S, HQ, H, D, device, timer))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    parser.add_argument("--quick", action="store_true", help="small shapes, fewer windows")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_attn needs a CUDA GPU")

    shapes = QUICK_SHAPES if args.quick else SHAPES
    windows = [None, 1024] if args.quick else WINDOWS
    caches = [4096, 16384] if args.quick else DECODE_CACHES
    prefill = bench_prefill(shapes, windows, use_flex=not args.no_flex)
    decode = bench_decode(caches, DECODE_HEADS)

    title = f"causal attention, bf16, {device_name()}, torch {torch.__version__} (ms, median; ratio < 1: ours faster)"
    text = print_table(prefill, ["shape", "window", "mode", "ours", "sdpa", "flex", "ours/sdpa", "ours/flex"], title)
    decode_columns = ["shape", "ours", "ours_w1024", "sdpa", "ours/sdpa", "ours_graph", "sdpa_graph", "ours_GB/s"]
    text += "\n\n" + print_table(decode, decode_columns,
                                 "decoding one step, bf16 (ms, median)")
    errors = [f"{r['shape']} w={r['window']} {r['mode']}: {k}={v}" for r in prefill for k, v in r.items()
              if k.endswith("_error")]
    if errors:
        text += "\n\nerrors:\n" + "\n".join(errors)
        print("\n".join(errors))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attn.txt"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(args.out, "attn.json"),
               {"device": device_name(), "torch": torch.__version__, "prefill": prefill, "decode": decode})


if __name__ == "__main__":
    main()
