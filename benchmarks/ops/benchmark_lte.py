"""LTE on one CUDA GPU: training attention (window + selected keys) and the decode step, beside their anchors.

    python -m benchmarks.ops.benchmark_lte [--out DIR] [--quick] [--no-flex]

Training attention, bf16, forward and forward+backward (median of triton.testing.do_bench), w = 768 (769 keys),
about 12.5% of keys selected at random, shapes B-T-HQ-H-D 8-4096-16-16-64 and 8-4096-32-8-64:
    - ours: ``fla.ops.lte.parallel_kernels.lte_attn_triton`` (score gradient included in the backward);
    - swa:  our sliding-window ``parallel_attn`` (Triton) with the same 769 keys per query: the floor LTE adds to;
    - flex: FlexAttention (compiled) with the same mask, the block mask built inside every step as training needs.
Decode step, bf16, B8 HQ16 H16 D64: ``lte_cache_step`` + ``lte_decoding_one_step`` over a 769-slot ring and a
512-slot buffer (the cost does not depend on the context) beside full-attention ``attn_decoding_one_step`` over
4K / 16K / 64K cached keys; each timed eagerly (Python and launches included), as one CUDA-graph replay of one
layer's step, and per layer in one graph of ``LTE_LAYERS`` layers' steps (each with its own cache), which is how a
graphed model runs them: one graph launch per token, not per layer. The ``lte+router`` columns add the router's
step (``LTERouter.decode_step`` with the paper's stack, ``ROUTER_CONV``: the new token into the router ring, the
score of the token 6 back into the cache), which a decode step of the layer pays every token.

Prints tables with ratios and writes OUT/lte.{txt,json} (default OUT: benchmarks/results). Asserts no speed.

``prefill_rows`` / ``decode_rows`` also take ``device="cpu"`` (float32, our torch paths, a wall-clock ``timer``,
small ``decode_shape``) for the CPU smoke run of ``python -m benchmarks.ops --quick``.
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import backend, bench_ms, device_name, graph_ms, print_table, write_json

SHAPES = [(8, 4096, 16, 16, 64), (8, 4096, 32, 8, 64)]
QUICK_SHAPES = [(2, 1024, 16, 16, 64)]
WINDOW = 768
FRACTION = 0.125
LTE_LAYERS = 12  # LTE layers of the paper's 0.4B laLTE (configs/gated_delta_net_lte_0.4B.json)
ROUTER_CONV = ([3, 3, 3], [2, 2, 2])  # its router's conv_size and conv_dilation (receptive field 13)


def _flex_step(q, k, v, selected, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    B, T, HQ, _ = q.shape
    G = HQ // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def run():
        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & ((qi - ki <= window) | selected[b, ki, h // G])

        block_mask = create_block_mask(mask_mod, B, HQ, T, T, device=q.device)
        return compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=G > 1)

    return run


def _ours_backend(device: str) -> str:
    return "triton" if torch.device(device).type == "cuda" else "torch"


def prefill_rows(shapes, use_flex: bool, rep_ms: int, device="cuda", timer=bench_ms):
    """Training attention fwd / fwd+bwd rows: ``lte_attn_triton`` on CUDA, the torch path of ``parallel_lte_attn``
    elsewhere."""
    from fla.ops.attn import parallel_attn
    from fla.ops.lte import parallel_lte_attn

    if torch.device(device).type == "cuda":
        from fla.ops.lte.parallel_kernels import lte_attn_triton
    else:
        def lte_attn_triton(q, k, v, score, selected, window_size, scale):
            return parallel_lte_attn(q, k, v, score, window_size, scale=scale, selected=selected)

    rows = []
    for B, T, HQ, H, D in shapes:
        dev = device
        dt = torch.bfloat16 if torch.device(dev).type == "cuda" else torch.float32
        q = torch.randn(B, T, HQ, D, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(B, T, H, D, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(B, T, H, D, device=dev, dtype=dt, requires_grad=True)
        score = (torch.rand(B, T, H, device=dev) - (1 - FRACTION)).requires_grad_(True)
        selected = score.detach() > 0
        do = torch.randn(B, T, HQ, D, device=dev, dtype=dt)
        leaves = [q, k, v, score]
        fns = {"ours": lambda: lte_attn_triton(q, k, v, score, selected, WINDOW, D ** -0.5),
               "swa": lambda: parallel_attn(q, k, v, window_size=WINDOW + 1)}
        if use_flex:
            fns["flex"] = _flex_step(q, k, v, selected, WINDOW)
        times = {}
        with backend(_ours_backend(dev)):
            for name, fn in fns.items():
                try:
                    times[name, "fwd"] = timer(lambda: fn(), rep_ms=rep_ms)
                    times[name, "fwdbwd"] = timer(lambda: fn().backward(do.transpose(1, 2) if name == "flex"
                                                                             else do), rep_ms=rep_ms,
                                                     grad_to_none=leaves)
                except Exception as e:  # report, keep going
                    print(f"{name} failed at {(B, T, HQ, H, D)}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        for mode in ("fwd", "fwdbwd"):
            row = {"shape": f"B{B}-T{T}-HQ{HQ}-H{H}-D{D}", "mode": mode}
            for name in fns:
                row[f"{name}_ms"] = round(times.get((name, mode), float("nan")), 3)
            row["ours/swa"] = round(row["ours_ms"] / row["swa_ms"], 2)
            if use_flex:
                row["ours/flex"] = round(row["ours_ms"] / row["flex_ms"], 2)
            rows.append(row)
            print(row, flush=True)
    return rows


def decode_rows(contexts, rep_ms: int, device="cuda", timer=bench_ms, decode_shape=(8, 16, 16, 64, 512)):
    """Decode-step rows; ``decode_shape`` = (B, HQ, H, D, buffer_size)."""
    from fla.ops.attn import attn_decoding_one_step
    from fla.ops.lte.cache import lte_cache_step, lte_empty_cache
    from fla.ops.lte.decoding import lte_decoding_one_step

    B, HQ, H, D, buffer_size = decode_shape
    dev = device
    dt = torch.bfloat16 if torch.device(dev).type == "cuda" else torch.float32
    def filled_cache():
        kc, vc, sc, sk, va = lte_empty_cache(B, WINDOW, buffer_size, H, D, D, dtype=dt, device=dev)
        kc.normal_(); vc.normal_(); sc.uniform_(-0.5, 0.5); va.fill_(True)
        return kc, vc, sc, sk, va

    kc, vc, sc, sk, va = filled_cache()
    q = torch.randn(B, 1, HQ, D, device=dev, dtype=dt)
    new_k, new_v = torch.randn(B, H, D, device=dev, dtype=dt), torch.randn(B, H, D, device=dev, dtype=dt)
    slot = torch.zeros(B, dtype=torch.long, device=dev)
    ones = torch.ones(B, dtype=torch.bool, device=dev)
    no_sink = ~ones  # a constant, built once: the model's step does not pay this launch

    def make_step(kc, vc, sc, sk, va, slot, router=None):
        if router is not None:  # the router's step too: its own ring, scoring the token m back into sc
            R = router.receptive_field
            ring = torch.randn(B, R, H * 2 * D, device=dev, dtype=dt)
            ring_valid = torch.ones(B, R, dtype=torch.bool, device=dev)
            pos = torch.zeros(B, dtype=torch.long, device=dev)

        def lte_step():
            if router is not None:
                router.decode_step(ring, ring_valid, new_k, new_v, ones, pos, sc, WINDOW)
                pos.add_(1)
            slot.add_(1).remainder_(WINDOW + 1)
            lte_cache_step(kc, vc, sc, sk, va, slot, new_k, new_v, ones, no_sink, WINDOW)
            return lte_decoding_one_step(q, kc, vc, va)
        return lte_step

    def make_router():
        from fla.layers.lte_router import LTERouter

        return LTERouter(H, D, *ROUTER_CONV).to(device=dev, dtype=dt).eval()

    lte_step = make_step(kc, vc, sc, sk, va, slot)
    router_step = make_step(*filled_cache(), torch.zeros(B, dtype=torch.long, device=dev), make_router())

    graphs = torch.device(dev).type == "cuda"
    rows = []
    with backend(_ours_backend(dev)):
        lte_ms = timer(lte_step, rep_ms=rep_ms)
        lte_graph_ms = _graph_or_nan(lte_step, rep_ms) if graphs else float("nan")
        router_ms = timer(router_step, rep_ms=rep_ms)
        router_graph_ms = _graph_or_nan(router_step, rep_ms) if graphs else float("nan")
        # per layer when a model's LTE_LAYERS layers step in one graph (one launch per token, as GraphDecoder does):
        # each layer has its own cache, so together they do not fit in L2 as one 42 MB cache would
        if graphs:
            steps = [make_step(*filled_cache(), torch.zeros(B, dtype=torch.long, device=dev))
                     for _ in range(LTE_LAYERS)]
            lte_layer_ms = _graph_or_nan(lambda: [s() for s in steps], rep_ms) / LTE_LAYERS
            steps = [make_step(*filled_cache(), torch.zeros(B, dtype=torch.long, device=dev), make_router())
                     for _ in range(LTE_LAYERS)]
            router_layer_ms = _graph_or_nan(lambda: [s() for s in steps], rep_ms) / LTE_LAYERS
            del steps
        for S in contexts:
            k = torch.randn(B, S, H, D, device=dev, dtype=dt)
            v = torch.randn(B, S, H, D, device=dev, dtype=dt)

            def full_step():
                return attn_decoding_one_step(q, k, v)

            full_ms = timer(full_step, rep_ms=rep_ms)
            row = {"context": S, "lte_step_us": round(lte_ms * 1e3, 1), "full_attn_us": round(full_ms * 1e3, 1),
                   "lte/full": round(lte_ms / full_ms, 2), "lte+router_step_us": round(router_ms * 1e3, 1)}
            if graphs:
                full_graph_ms = _graph_or_nan(full_step, rep_ms)
                full_layer_ms = _graph_or_nan(lambda: [full_step() for _ in range(LTE_LAYERS)], rep_ms) / LTE_LAYERS
                row.update({"lte_graph_us": round(lte_graph_ms * 1e3, 1),
                            "full_graph_us": round(full_graph_ms * 1e3, 1),
                            "lte/full (graph)": round(lte_graph_ms / full_graph_ms, 2),
                            f"lte_graph_{LTE_LAYERS}L_us": round(lte_layer_ms * 1e3, 1),
                            f"full_graph_{LTE_LAYERS}L_us": round(full_layer_ms * 1e3, 1),
                            f"lte/full ({LTE_LAYERS}L graph)": round(lte_layer_ms / full_layer_ms, 2),
                            "lte+router_graph_us": round(router_graph_ms * 1e3, 1),
                            f"lte+router_graph_{LTE_LAYERS}L_us": round(router_layer_ms * 1e3, 1),
                            f"lte+router/full ({LTE_LAYERS}L graph)": round(router_layer_ms / full_layer_ms, 2)})
            rows.append(row)
            print(rows[-1], flush=True)
            del k, v
    return rows


def _graph_or_nan(fn, rep_ms: int) -> float:
    """``graph_ms(fn)``, or NaN (with a printed reason) when ``fn`` cannot be captured."""
    try:
        return graph_ms(fn, rep_ms=rep_ms)
    except Exception as e:  # report, keep going
        print(f"CUDA-graph capture failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--rep-ms", type=int, default=100)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_lte needs a CUDA GPU")
    decode = decode_rows([4096] if args.quick else [4096, 16384, 65536], args.rep_ms)
    prefill = prefill_rows(QUICK_SHAPES if args.quick else SHAPES, not args.no_flex, args.rep_ms)
    title = f"LTE on {device_name()}, torch {torch.__version__}"
    text = print_table(prefill, list(prefill[0]), title=title + ": training attention (ms)") + "\n"
    text += print_table(decode, list(decode[0]), title=title + ": decode step, B8 HQ16 H16 D64 (us)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lte.txt"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(args.out, "lte.json"), {"device": device_name(), "prefill": prefill, "decode": decode})


if __name__ == "__main__":
    main()
