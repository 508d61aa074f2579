"""One runner over every op benchmark: each suite returns rows of one schema, printed as one table.

Row schema: ``op``, ``shape``, ``mode`` (fwd, fwdbwd, decode), ``ours_ms``, ``anchor`` (what ours is compared with,
"-" when nothing is), ``anchor_ms``, ``ours/anchor`` (below 1: ours is faster; both from the same run), ``note``.
An op with several anchors gives one row per anchor. The suites call the per-op benchmark modules
(``benchmark_gated_delta_rule``, ``benchmark_attn``, ``benchmark_lte``); NSA is measured here (it has no module of
its own). On CUDA: bf16, our Triton paths (FLA_BACKEND=triton), ``triton.testing.do_bench`` medians. On the CPU
(the ``--quick`` smoke run): float32, our torch paths, wall-clock medians, tiny shapes, no CUDA-only anchor.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from benchmarks.common import backend, bench_ms, graph_ms

# paper layer shapes: 0.4B = hidden 1024 (GDN H8 D128, SWA / LTE HQ16 H16 D64, NSA HQ32 H2 D64);
# 1.4B = hidden 2048 (GDN H8 D256, LTE HQ32 H8 D64, NSA HQ32 H2 D64)
NSA_SHAPES = [(8, 4096, 32, 2, 64), (2, 16384, 32, 2, 64)]  # B, T, HQ, H, D
NSA_BLOCK_SIZE, NSA_BLOCK_COUNTS, NSA_WINDOW = 64, 16, 512
NSA_DECODE_CACHES = [4096, 16384, 65536]

# CPU smoke shapes (the torch paths in float32 on a small machine)
CPU_GDN = {"shapes": [(1, 256, 2, 32)], "decode_shapes": [(1, 2, 32)]}
CPU_ATTN = {"shapes": [(1, 256, 4, 4, 32), (1, 256, 8, 2, 32)], "windows": [None, 64], "caches": [512],
            "heads": [(4, 4, 32)], "batch": 2}
CPU_NSA = {"shapes": [(1, 256, 8, 2, 32)], "block_size": 16, "block_counts": 4, "window": 32, "caches": [512],
           "batch": 2}
CPU_LTE = {"shapes": [(1, 256, 4, 4, 32)], "decode_shape": (2, 4, 4, 32, 64), "contexts": [512]}

SUITES = ("gdn", "attn", "nsa", "lte")


def cpu_ms(fn: Callable[[], object], warmup_ms: int = 0, rep_ms: int = 50, grad_to_none=None) -> float:
    """Wall-clock median of ``fn()`` in ms (one warm-up call, then at least 3 calls, up to ``rep_ms`` or 20)."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < 3 or ((time.perf_counter() - start) * 1e3 < rep_ms and len(times) < 20):
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timer_for(device: str) -> Callable[..., float]:
    return bench_ms if device == "cuda" else cpu_ms


def _time_or_error(timer: Callable[..., float], fn: Callable[[], object], backend_name: str, **kwargs):
    """``timer(fn, **kwargs)`` in ms under ``FLA_BACKEND=backend_name``, or the error as a short string (one
    broken case is reported in its row and the run goes on)."""
    try:
        with backend(backend_name):
            return timer(fn, **kwargs)
    except Exception as e:  # noqa: BLE001 - report, keep going
        return f"{type(e).__name__}: {str(e)[:120]}"


def _row(op: str, shape: str, mode: str, ours, anchor: str = "-", anchor_ms=None, note: str = "") -> Dict:
    ours_ms = ours if isinstance(ours, (int, float)) else None
    row = {"op": op, "shape": shape, "mode": mode, "ours_ms": ours_ms, "anchor": anchor, "anchor_ms": None,
           "ours/anchor": None, "note": note}
    if isinstance(anchor_ms, (int, float)) and anchor_ms == anchor_ms:  # not NaN
        row["anchor_ms"] = float(anchor_ms)
        if ours_ms is not None and anchor_ms > 0:
            row["ours/anchor"] = ours_ms / anchor_ms
    elif isinstance(anchor_ms, str):
        row["note"] = (note + "; " if note else "") + f"anchor: {anchor_ms}"
    if isinstance(ours, str):
        row["note"] = (row["note"] + "; " if row["note"] else "") + f"ours: {ours}"
    return row


# ------------------------------------------------------------------------------------------------ suites

def gdn_rows(quick: bool, device: str, anchor_path: Optional[str] = None, notes: Optional[List[str]] = None):
    """Gated delta rule: chunk fwd / fwd+bwd and the decode step; anchor: fla-core in a child process."""
    from benchmarks.ops import benchmark_gated_delta_rule as gdr

    if device == "cuda":
        shapes = gdr.QUICK_SHAPES if quick else gdr.SHAPES
        decode_shapes = gdr.DECODE_SHAPES
    else:
        shapes, decode_shapes = CPU_GDN["shapes"], CPU_GDN["decode_shapes"]
    with backend("triton" if device == "cuda" else "torch"):
        ours = gdr.measure(shapes, 25, 100 if device == "cuda" else 30, decode_shapes, device=device)
    anchor = None
    if anchor_path and device == "cuda":
        anchor = gdr.measure_anchor(anchor_path, shapes, 25, 100, decode_shapes)["rows"]
    elif notes is not None:
        notes.append("gdn: the fla-core anchor (--anchor-path) needs CUDA; skipped" if anchor_path else
                     "gdn: no fla-core anchor (pass --anchor-path DIR holding upstream's `fla` package)")
    rows = []
    for r in gdr.compare(ours, anchor):
        op = "gdn_decode" if r["mode"] == "decode" else "gdn_chunk"
        if anchor is None:
            rows.append(_row(op, r["shape"], r["mode"], r["ours_ms"]))
        else:
            rows.append(_row(op, r["shape"], r["mode"], r["ours_ms"], "fla-core", r.get("anchor_ms")))
    return rows


def _fla_core_rows(anchor_path: Optional[str], device: str, jobs: List[Dict], notes: Optional[List[str]],
                   suite: str) -> Dict:
    """fla-core's times for ``jobs`` (``benchmarks.ops.fla_core_anchor``), keyed by (shape, mode); an error string
    stands for a refused job. Empty without ``anchor_path`` or CUDA (with a note saying so)."""
    if not anchor_path or device != "cuda":
        if notes is not None:
            notes.append(f"{suite}: the fla-core anchor needs --anchor-path DIR and CUDA; skipped")
        return {}
    from benchmarks.ops.fla_core_anchor import measure_anchor

    times = {}
    for r in measure_anchor(anchor_path, jobs)["rows"]:
        for mode in ("fwd", "fwdbwd"):
            times[r["key"], mode] = r.get(f"{mode}_ms", r.get("error", "no result"))
    return times


def attn_rows(quick: bool, device: str, use_flex: bool = True, notes: Optional[List[str]] = None,
              anchor_path: Optional[str] = None):
    """Softmax attention: full / sliding-window prefill (vs SDPA, FlexAttention, fla-core's ``parallel_attn``) and
    the decode step (vs SDPA; on CUDA also both replayed as CUDA graphs, ``attn_decode_graph``)."""
    from benchmarks.ops import benchmark_attn as ba

    timer = timer_for(device)
    if device == "cuda":
        shapes = ba.QUICK_SHAPES if quick else ba.SHAPES
        windows = [None, 1024] if quick else ba.WINDOWS
        caches, heads, batch = ([4096, 16384] if quick else ba.DECODE_CACHES), ba.DECODE_HEADS, 8
    else:
        shapes, windows = CPU_ATTN["shapes"], CPU_ATTN["windows"]
        caches, heads, batch = CPU_ATTN["caches"], CPU_ATTN["heads"], CPU_ATTN["batch"]
        if use_flex and notes is not None:
            notes.append("attn / lte: FlexAttention anchor skipped on the CPU (compiled for CUDA only here)")
        use_flex = False
    jobs = [{"op": "attn", "B": B, "T": T, "HQ": HQ, "H": H, "D": D, "window": w,
             "key": f"B{B}-T{T}-HQ{HQ}-H{H}-D{D}|{w}"} for B, T, HQ, H, D in shapes for w in windows]
    fla_core = _fla_core_rows(anchor_path, device, jobs, notes, "attn")
    rows = []
    for r in ba.bench_prefill(shapes, windows, use_flex=use_flex, device=device, timer=timer):
        op = "attn_full" if r["window"] is None else f"attn_swa{r['window']}"
        anchors = [(name, r.get(name) if r.get(name) is not None else r.get(f"{name}_error"))
                   for name in ("sdpa", "flex") if name in r or f"{name}_error" in r]
        if fla_core:
            anchors.append(("fla-core", fla_core.get((f"{r['shape']}|{r['window']}", r["mode"]), "no result")))
        ours = r["ours"] if r.get("ours") is not None else r.get("ours_error", "failed")
        if not anchors:
            rows.append(_row(op, r["shape"], r["mode"], ours))
        for name, value in anchors:
            rows.append(_row(op, r["shape"], r["mode"], ours, name, value))
    for r in ba.bench_decode(caches, heads, B=batch, device=device, timer=timer):
        rows.append(_row("attn_decode", r["shape"], "decode", r["ours"], "sdpa", r["sdpa"]))
        rows.append(_row("attn_decode_w1024", r["shape"], "decode", r["ours_w1024"], "sdpa (full cache)",
                         r["sdpa"]))
        if "ours_graph" in r:  # CUDA: both replayed as graphs, what a graphed decode loop pays
            rows.append(_row("attn_decode_graph", r["shape"], "decode", r["ours_graph"], "sdpa, graph",
                             r["sdpa_graph"]))
            rows.append(_row("attn_decode_w1024_graph", r["shape"], "decode", r["ours_w1024_graph"],
                             "sdpa (full cache), graph", r["sdpa_graph"]))
    return rows


def _nsa_inputs(B, T, HQ, H, D, device, dtype, requires_grad):
    torch.manual_seed(0)
    q = torch.randn(B, T, HQ, D, device=device, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=requires_grad)
    gates = [torch.rand(B, T, HQ, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]
    return q, k, v, gates


def _nsa_shape(B, T, HQ, H, D, block_size, block_counts, window) -> str:
    """The NSA rows' shape column, also the key of fla-core's results."""
    return f"B{B}-T{T}-HQ{HQ}-H{H}-D{D}-bs{block_size}-S{block_counts}-w{window}"


def nsa_rows(quick: bool, device: str, notes: Optional[List[str]] = None, anchor_path: Optional[str] = None):
    """NSA prefill fwd / fwd+bwd beside full causal SDPA at the same shape (the cost NSA replaces); without the
    window branch (``window_size=0``) beside fla-core's ``parallel_nsa``, whose window branch needs flash-attn
    (anchors.md); and the NSA decode step beside SDPA over the whole cache, eager and (CUDA) both replayed as CUDA
    graphs (``nsa_decode_graph``: the kernels without Python and launch latency, what a graphed decode loop pays)."""
    from fla.ops.nsa import mean_pool_blocks, nsa_decoding_one_step, parallel_nsa

    timer = timer_for(device)
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        shapes = NSA_SHAPES[:1] if quick else NSA_SHAPES
        bs, sc, w = NSA_BLOCK_SIZE, NSA_BLOCK_COUNTS, NSA_WINDOW
        caches, batch = ([4096] if quick else NSA_DECODE_CACHES), 8
    else:
        shapes, bs, sc, w = CPU_NSA["shapes"], CPU_NSA["block_size"], CPU_NSA["block_counts"], CPU_NSA["window"]
        caches, batch = CPU_NSA["caches"], CPU_NSA["batch"]
    if notes is not None:
        notes.append("nsa: the SDPA rows are full causal attention at the same shape, the cost NSA replaces; "
                     "fla-core's parallel_nsa needs flash-attn for its window branch, so it is compared at w=0")
    jobs = [{"op": "nsa", "B": B, "T": T, "HQ": HQ, "H": H, "D": D, "block_size": bs, "block_counts": sc,
             "key": _nsa_shape(B, T, HQ, H, D, bs, sc, 0)} for B, T, HQ, H, D in shapes]
    fla_core = _fla_core_rows(anchor_path, device, jobs, notes, "nsa")
    ours_backend = "triton" if cuda else "torch"
    rows = []
    for B, T, HQ, H, D in shapes:
        q, k, v, (gc, gs, gw) = _nsa_inputs(B, T, HQ, H, D, device, dtype, True)
        do = torch.randn_like(q)
        leaves = [q, k, v, gc, gs, gw]
        shape = _nsa_shape(B, T, HQ, H, D, bs, sc, w)

        def ours():
            return parallel_nsa(q, k, v, gc, gs, gw, block_counts=sc, block_size=bs, window_size=w)

        def sdpa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=HQ != H).transpose(1, 2)

        for mode in ("fwd", "fwdbwd"):
            times = {}
            for name, fn in (("ours", ours), ("sdpa", sdpa)):
                call = fn if mode == "fwd" else (lambda fn=fn: fn().backward(do))
                times[name] = _time_or_error(timer, call, ours_backend, grad_to_none=leaves)
            rows.append(_row("nsa", shape, mode, times["ours"], "sdpa full causal", times["sdpa"]))
        if fla_core:  # the shared configuration: no window branch
            shape0 = _nsa_shape(B, T, HQ, H, D, bs, sc, 0)

            def ours0():
                return parallel_nsa(q, k, v, gc, gs, None, block_counts=sc, block_size=bs, window_size=0)

            for mode in ("fwd", "fwdbwd"):
                call = ours0 if mode == "fwd" else (lambda: ours0().backward(do))
                ours_ms = _time_or_error(timer, call, ours_backend, grad_to_none=leaves)
                rows.append(_row("nsa", shape0, mode, ours_ms, "fla-core", fla_core.get((shape0, mode), "no result")))
        del q, k, v, gc, gs, gw, leaves, do
        if cuda:
            torch.cuda.empty_cache()
    HQ, H, D = shapes[0][2:]
    for S in caches:
        q, k, v, (gc, gs, gw) = _nsa_inputs(batch, S, HQ, H, D, device, dtype, False)
        q, gc, gs, gw = q[:, -1:], gc[:, -1:], gs[:, -1:], gw[:, -1:]
        k_cmp, v_cmp = mean_pool_blocks(k, bs), mean_pool_blocks(v, bs)
        seq_lens = torch.full((batch,), S, dtype=torch.long, device=device)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        shape = f"B{batch}-S{S}-HQ{HQ}-H{H}-D{D}"
        def ours():
            return nsa_decoding_one_step(q, k, v, k_cmp, v_cmp, seq_lens, gc, gs, gw, block_counts=sc,
                                         block_size=bs, window_size=w)

        def sdpa():
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=HQ != H)

        rows.append(_row("nsa_decode", shape, "decode", _time_or_error(timer, ours, ours_backend),
                         "sdpa (full cache)", timer(sdpa)))
        if cuda:  # both replayed as CUDA graphs: the kernels without Python and launch latency
            rows.append(_row("nsa_decode_graph", shape, "decode", _time_or_error(graph_ms, ours, ours_backend),
                             "sdpa (full cache), graph", graph_ms(sdpa)))
        del q, k, v, k_cmp, v_cmp
        if cuda:
            torch.cuda.empty_cache()
    return rows


def lte_rows(quick: bool, device: str, use_flex: bool = True, notes: Optional[List[str]] = None):
    """LTE training attention (vs our sliding window with the same window, and FlexAttention with the LTE mask
    built per step) and the LTE decode step (cache update + attention) vs full-attention decode over S keys."""
    from benchmarks.ops import benchmark_lte as bl

    timer = timer_for(device)
    if device == "cuda":
        shapes = bl.QUICK_SHAPES if quick else bl.SHAPES
        contexts, decode_shape, rep_ms = ([4096] if quick else [4096, 16384, 65536]), (8, 16, 16, 64, 512), 100
    else:
        shapes, contexts, decode_shape, rep_ms = CPU_LTE["shapes"], CPU_LTE["contexts"], CPU_LTE["decode_shape"], 30
        use_flex = False
    rows = []
    prefill = bl.prefill_rows(shapes, use_flex, rep_ms, device=device, timer=timer)
    for r in prefill:
        for name in ("swa", "flex"):
            if f"{name}_ms" in r:
                rows.append(_row("lte_train_attn", r["shape"], r["mode"], r["ours_ms"], name, r[f"{name}_ms"],
                                 note=f"w={bl.WINDOW}, {bl.FRACTION:.1%} selected"))
    B, HQ, H, D, buffer_size = decode_shape
    cache_rows = _lte_cache_prefill_rows(shapes, buffer_size, device, timer, bl.WINDOW)
    rows += cache_rows + _lte_prefill_rows(prefill, cache_rows, shapes)
    for r in bl.decode_rows(contexts, rep_ms, device=device, timer=timer, decode_shape=decode_shape):
        shape = f"B{B}-HQ{HQ}-H{H}-D{D}-w{bl.WINDOW}-b{buffer_size}"
        rows.append(_row("lte_decode", shape, "decode", r["lte_step_us"] / 1e3, f"full attn decode S={r['context']}",
                         r["full_attn_us"] / 1e3, note="eager: Python and launches included"))
        if "lte_graph_us" in r:
            rows.append(_row("lte_decode", shape, "decode-graph", r["lte_graph_us"] / 1e3,
                             f"full attn decode S={r['context']}", r["full_graph_us"] / 1e3,
                             note="one CUDA-graph replay each (cache update + attention)"))
        layered = f"lte_graph_{bl.LTE_LAYERS}L_us"
        if layered in r:
            rows.append(_row("lte_decode", shape, f"decode-graph-{bl.LTE_LAYERS}L", r[layered] / 1e3,
                             f"full attn decode S={r['context']}", r[f"full_graph_{bl.LTE_LAYERS}L_us"] / 1e3,
                             note=f"per layer: {bl.LTE_LAYERS} layers' steps in one CUDA graph, each own cache"))
        layered = f"lte+router_graph_{bl.LTE_LAYERS}L_us"
        if layered in r:
            rows.append(_row("lte_decode", shape, f"decode-graph-{bl.LTE_LAYERS}L+router", r[layered] / 1e3,
                             f"full attn decode S={r['context']}", r[f"full_graph_{bl.LTE_LAYERS}L_us"] / 1e3,
                             note=f"per layer, {bl.LTE_LAYERS} layers in one graph: router step + cache update + "
                                  "attention"))
    return rows


# The reference's ``flash_lte_attention`` prefill (anchors.md, H200): its time over FlexAttention's sliding-window
# forward on the same card, where anchors.md has both.
REFERENCE_LTE_PREFILL = {(8, 4096, 16, 16, 64): "reference flash_lte_attention 0.657 ms = 1.74x FlexAttention SWA "
                                                "fwd 0.378 ms (anchors.md, H200)",
                         (8, 4096, 32, 8, 64): "reference flash_lte_attention 1.034 ms (anchors.md, H200)"}


def _lte_prefill_rows(prefill: List[Dict], cache_rows: List[Dict], shapes) -> List[Dict]:
    """Our cached prefill (LTE attention forward + decode-cache build) over our sliding-window forward, same run."""
    rows = []
    fwd = [r for r in prefill if r["mode"] == "fwd"]
    for shape, r, c in zip(shapes, fwd, cache_rows):
        ours = r["ours_ms"] + c["ours_ms"] if c["ours_ms"] is not None else r["ours_ms"]
        rows.append(_row("lte_prefill", r["shape"], "fwd", ours, "our swa fwd", r["swa_ms"],
                         note=REFERENCE_LTE_PREFILL.get(tuple(shape), "attention fwd + cache build")))
    return rows


def _lte_cache_prefill_rows(shapes, buffer_size: int, device: str, timer, window: int):
    """``lte_cache_prefill``: the decode cache (ring of w + 1 + top-b buffer) built from a whole prompt."""
    from fla.ops.lte import lte_cache_prefill

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for B, T, _, H, D in shapes:
        torch.manual_seed(0)
        k = torch.randn(B, T, H, D, device=device, dtype=dtype)
        v = torch.randn(B, T, H, D, device=device, dtype=dtype)
        score = torch.rand(B, T, H, device=device) - 0.875  # about 12.5% kept, as in the attention rows
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
        sink = torch.zeros_like(valid)
        sink[:, :4] = True
        ms = _time_or_error(timer, lambda: lte_cache_prefill(k, v, score, sink, valid, window, buffer_size),
                            "triton" if device == "cuda" else "torch")
        rows.append(_row("lte_cache_prefill", f"B{B}-T{T}-H{H}-D{D}-w{window}-b{buffer_size}", "fwd", ms,
                         note="cache build after the prompt's attention"))
    return rows


def run_suites(names, quick: bool, device: str, use_flex: bool = True, anchor_path: Optional[str] = None,
               progress: Callable[[str], None] = print):
    """Run the named suites; returns (rows, notes, errors). A suite that raises is reported, not fatal."""
    rows, notes, errors = [], [], []
    for i, name in enumerate(names, 1):
        start = time.perf_counter()
        progress(f"[{i}/{len(names)}] {name} ...")
        try:
            if name == "gdn":
                rows += gdn_rows(quick, device, anchor_path, notes)
            elif name == "attn":
                rows += attn_rows(quick, device, use_flex, notes, anchor_path)
            elif name == "nsa":
                rows += nsa_rows(quick, device, notes, anchor_path)
            elif name == "lte":
                rows += lte_rows(quick, device, use_flex, notes)
            else:
                raise ValueError(f"unknown suite {name!r}; choose from {SUITES}")
        except Exception as e:  # noqa: BLE001 - one broken op must not hide the others
            errors.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
            progress(f"[{i}/{len(names)}] {name} FAILED: {errors[-1]}")
        progress(f"[{i}/{len(names)}] {name} done in {time.perf_counter() - start:.1f}s")
    return rows, notes, errors
