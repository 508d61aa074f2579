"""nsa_decoding_one_step's Triton path (``fla.ops.nsa.decoding_kernels``): under the CPU interpreter at tiny shapes
against the torch path and the reference (``naive_nsa``, i.e. ``parallel_nsa``'s last query) per row, and on the
GPU at realistic sizes against the torch path (gpu marker)."""

import pytest
import torch

from fla.ops.nsa import append_compressed_blocks, naive_nsa, nsa_decoding_one_step, parallel_nsa
from fla.ops.nsa.compression import compression_attention, select_blocks
from fla.ops.nsa.decoding_kernels import _prepare, compress_and_rank
from fla.utils.testing import assert_close, forbid_host_sync

GATES = ("g_cmp", "g_slc", "g_swa")


def make_step(lens, C, HQ, H, D, V, BS, NB=None, dtype=torch.float32, device="cpu"):
    """(q, k_cache, v_cache, k_cmp, v_cmp, seq_lens, gates) with row n's first lens[n] tokens filled and pooled;
    the cache slots beyond a row's length hold garbage (they must never be read)."""
    N = len(lens)
    lens_t = torch.tensor(lens, device=device)
    k_cache = torch.randn(N, C, H, D, device=device).to(dtype)
    v_cache = torch.randn(N, C, H, V, device=device).to(dtype)
    NB = -(-C // BS) if NB is None else NB
    k_cmp, v_cmp = append_compressed_blocks(torch.full((N, NB, H, D), 1e4, device=device, dtype=dtype),
                                            torch.full((N, NB, H, V), 1e4, device=device, dtype=dtype),
                                            k_cache, v_cache, torch.zeros_like(lens_t), lens_t, BS)
    q = torch.randn(N, 1, HQ, D, device=device).to(dtype)
    gates = [torch.rand(N, 1, HQ, device=device).to(dtype) for _ in GATES]
    return q, k_cache, v_cache, k_cmp, v_cmp, lens_t, gates


def run(monkeypatch, backend, q, k_cache, v_cache, k_cmp, v_cmp, lens, gates, **kw):
    monkeypatch.setenv("FLA_BACKEND", backend)
    return nsa_decoding_one_step(q, k_cache, v_cache, k_cmp, v_cmp, lens, *gates, **kw)


def reference_rows(q, k_cache, v_cache, lens, gates, **kw):
    """naive_nsa's last query of every row (zeros for an empty row)."""
    outs = []
    for n, L in enumerate(lens.tolist()):
        if L == 0:
            outs.append(torch.zeros(1, 1, q.shape[2], v_cache.shape[-1]))
            continue
        outs.append(naive_nsa(q[n:n + 1].float(), k_cache[n:n + 1, :L].float(), v_cache[n:n + 1, :L].float(),
                              *[None if g is None else g[n:n + 1].float() for g in gates], **kw))
    return torch.cat(outs, 0)


@pytest.mark.parametrize("lens, C, HQ, H, D, V, BS, S, W, NB", [
    ([0, 1, 8, 16, 37, 80], 80, 6, 2, 8, 8, 8, 3, 10, None),     # group of 3; empty, 1 token, block boundaries
    ([5, 63, 64, 33], 64, 32, 2, 16, 16, 8, 4, 12, None),        # group of 16 (the paper's HQ 32 / H 2)
    ([2, 17, 40, 41], 41, 4, 4, 8, 12, 4, 16, 6, 14),            # G = 1, D != V, more blocks asked than exist,
                                                                 # C not a multiple of BS, NB larger than needed
    ([100, 3, 73], 100, 4, 1, 20, 8, 16, 2, 0, None),            # D = 20 (masked features), no window branch
    ([31, 32, 90], 96, 6, 2, 8, 8, 32, 2, 40, None),             # block larger than a tile
    ([9, 16, 50, 23], 56, 4, 2, 8, 8, 8, 1, 5, None),            # one block: the forced ranks' order decides
    ([3, 20, 70, 133], 200, 4, 2, 8, 8, 4, 5, 6, None),          # 50 candidate columns: several tiles of them
])
def test_triton_matches_torch_path_and_reference(monkeypatch, lens, C, HQ, H, D, V, BS, S, W, NB):
    q, kc, vc, kcmp, vcmp, lens_t, gates = make_step(lens, C, HQ, H, D, V, BS, NB)
    if not W:
        gates[2] = None
    kw = dict(block_counts=S, block_size=BS, window_size=W)
    out = run(monkeypatch, "triton", q, kc, vc, kcmp, vcmp, lens_t, gates, **kw)
    ref = run(monkeypatch, "torch", q, kc, vc, kcmp, vcmp, lens_t, gates, **kw)
    assert_close("o vs torch path", out, ref, 1e-5)
    assert_close("o vs naive_nsa", out, reference_rows(q, kc, vc, lens_t, gates, **kw), 1e-5)
    for n, L in enumerate(lens):
        if L == 0:
            assert torch.equal(out[n], torch.zeros_like(out[n])), "an empty row must output zeros"


@pytest.mark.parametrize("off", [("g_cmp",), ("g_slc",), ("g_swa",), ("g_cmp", "g_slc"), ("g_cmp", "g_swa"),
                                 ("g_slc", "g_swa"), ("g_cmp", "g_slc", "g_swa")])
def test_branch_subsets(monkeypatch, off):
    lens = [0, 1, 9, 24, 47]
    q, kc, vc, kcmp, vcmp, lens_t, gates = make_step(lens, 48, 6, 2, 8, 8, 8)
    gates = [None if name in off else g for name, g in zip(GATES, gates)]
    kw = dict(block_counts=3, block_size=8, window_size=0 if gates[2] is None else 7)
    out = run(monkeypatch, "triton", q, kc, vc, kcmp, vcmp, lens_t, gates, **kw)
    ref = run(monkeypatch, "torch", q, kc, vc, kcmp, vcmp, lens_t, gates, **kw)
    assert_close("o", out, ref, 1e-5)
    if gates == [None] * 3:
        assert torch.equal(out, torch.zeros_like(out))


def test_window_size_given_with_gate_none_of_window(monkeypatch):
    """window_size 0 / None with a g_swa gate: no window branch (as on the torch path)."""
    q, kc, vc, kcmp, vcmp, lens_t, gates = make_step([7, 30], 32, 4, 2, 8, 8, 8)
    for w in (0, None):
        out = run(monkeypatch, "triton", q, kc, vc, kcmp, vcmp, lens_t, gates, block_counts=2, block_size=8,
                  window_size=w)
        ref = run(monkeypatch, "torch", q, kc, vc, kcmp, vcmp, lens_t, gates, block_counts=2, block_size=8,
                  window_size=w)
        assert_close(f"o window {w}", out, ref, 1e-5)


def _torch_picks(q, k_cmp, v_cmp, lens, C, BS, S):
    """Sets of selected blocks per (row, kv head) from the torch path's functions."""
    N, _, HQ, D = q.shape
    H = k_cmp.shape[2]
    _, probs = compression_attention(q.float().view(N, 1, H, HQ // H, D), k_cmp.float(), v_cmp.float(),
                                     (lens // BS)[:, None], D ** -0.5)
    P = (lens - 1).clamp(min=0)
    idx = select_blocks(probs, (P // BS)[:, None], max(k_cmp.shape[1], -(-C // BS)), S)[:, 0]
    return [[set(c for c in idx[n, h].tolist() if c >= 0) for h in range(H)] for n in range(N)]


def _kernel_picks(q, k_cache, v_cache, k_cmp, v_cmp, lens, C, BS, S):
    N, H = q.shape[0], k_cmp.shape[2]
    q, _, _, k_cmp, v_cmp, lens, fp32 = _prepare(q, k_cache, v_cache, k_cmp, v_cmp, lens)
    _, val, idx = compress_and_rank(q, k_cmp, v_cmp, lens, C, S, BS, q.shape[-1] ** -0.5, fp32, False, True)
    val, idx = val.view(N, H, -1), idx.view(N, H, -1)
    return [[set(c for c, x in zip(idx[n, h].tolist(), val[n, h].tolist()) if x > float("-inf"))
             for h in range(H)] for n in range(N)]


def test_selection_equals_torch_and_a_dominant_block_is_picked():
    """The picks of kernel 1 + topk equal the torch selection (as sets, -inf picks dropped), and a block whose
    pooled key is aligned with every query head of its group is picked though no rank is forced on it."""
    C, HQ, H, D, BS, S = 96, 6, 2, 16, 8, 4
    lens = [96, 70, 50, 8, 0]
    q, kc, vc, kcmp, vcmp, lens_t, _ = make_step(lens, C, HQ, H, D, D, BS)
    hot = [5, 3, 2, 0, 0]  # one block c with 0 < c < IC - 1 per row (rows 3, 4: none)
    for n, c in enumerate(hot[:3]):
        kcmp[n, c] = 4 * q[n, 0].view(H, HQ // H, D).mean(1)
    ref = _torch_picks(q, kcmp, vcmp, lens_t, C, BS, S)
    got = _kernel_picks(q, kc, vc, kcmp, vcmp, lens_t, C, BS, S)
    assert got == ref
    for n, c in enumerate(hot[:3]):
        assert all(c in got[n][h] for h in range(H)), f"row {n}: block {c} not picked: {got[n]}"
    assert got[3] == [{0}] * H  # 8 tokens: block 0 is the current block, the only candidate


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 5e-3)])
def test_half_precision(monkeypatch, dtype, tol):
    q, kc, vc, kcmp, vcmp, lens_t, gates = make_step([0, 20, 64, 71], 72, 32, 2, 16, 16, 8, dtype=dtype)
    kw = dict(block_counts=3, block_size=8, window_size=10)
    out = run(monkeypatch, "triton", q, kc, vc, kcmp, vcmp, lens_t, gates, **kw)
    ref = run(monkeypatch, "torch", q, kc, vc, kcmp, vcmp, lens_t, gates, **kw)
    assert out.dtype == dtype
    assert_close("o", out.float(), ref.float(), tol)


def test_strided_inputs_mixed_dtypes_and_no_host_sync(monkeypatch):
    """Caches that are views of larger buffers (row / time strides), gates sliced out of one projection, float32
    compressed caches under bf16 raw caches; the step reads no device value on the host."""
    N, C, HQ, H, D, BS = 3, 40, 4, 2, 8, 8
    lens = torch.tensor([40, 13, 0])
    big_k, big_v = torch.randn(N, C + 9, H, D), torch.randn(N, C + 9, H, D)
    kc, vc = big_k[:, 3:3 + C], big_v[:, 3:3 + C]
    kcmp, vcmp = append_compressed_blocks(torch.zeros(N, C // BS, H, D), torch.zeros(N, C // BS, H, D), kc, vc,
                                          torch.zeros_like(lens), lens, BS)
    q = torch.randn(N, 1, HQ, D)
    proj = torch.rand(N, 1, 3 * HQ)
    gates = list(proj.split(HQ, -1))
    kw = dict(block_counts=2, block_size=BS, window_size=9)
    monkeypatch.setenv("FLA_BACKEND", "triton")
    with forbid_host_sync():
        out = nsa_decoding_one_step(q, kc, vc, kcmp, vcmp, lens, *gates, **kw)
    ref = run(monkeypatch, "torch", q, kc, vc, kcmp, vcmp, lens, gates, **kw)
    assert_close("o strided", out, ref, 1e-5)
    kb, vb = kc.to(torch.bfloat16), vc.to(torch.bfloat16)
    out = run(monkeypatch, "triton", q, kb, vb, kcmp, vcmp, lens.int(), gates, **kw)
    ref = run(monkeypatch, "torch", q, kb, vb, kcmp, vcmp, lens.int(), gates, **kw)
    assert_close("o mixed dtypes", out, ref, 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# GPU (the lead runs these on an H100 / H200)


def _gpu_step(context, dtype, N=8, HQ=32, H=2, D=64, BS=64):
    torch.manual_seed(context)
    lens = torch.randint(1, context + 1, (N,))
    lens[:4] = torch.tensor([context, BS * (context // BS // 2), 0, 1])  # full, at a block boundary, empty, 1 token
    C = context + 64  # capacity beyond the longest row (reserved, unfilled slots)
    q, kc, vc, kcmp, vcmp, lens_t, gates = make_step(lens.tolist(), C, HQ, H, D, D, BS, dtype=dtype, device="cuda")
    return q, kc, vc, kcmp, vcmp, lens_t, gates


@pytest.mark.gpu
@pytest.mark.parametrize("context", [4096, 65536])
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
def test_gpu_matches_torch_path(monkeypatch, context, dtype, tol):
    q, kc, vc, kcmp, vcmp, lens_t, gates = _gpu_step(context, dtype)
    kw = dict(block_counts=16, block_size=64, window_size=512)
    out = run(monkeypatch, "triton", q, kc, vc, kcmp, vcmp, lens_t, gates, **kw)
    ref = run(monkeypatch, "torch", q, kc, vc, kcmp, vcmp, lens_t, gates, **kw)
    assert_close("o", out.float(), ref.float(), tol)
    for i in range(3):  # each branch alone
        only = [g if j == i else None for j, g in enumerate(gates)]
        kw_i = dict(kw, window_size=512 if i == 2 else 0)
        out = run(monkeypatch, "triton", q, kc, vc, kcmp, vcmp, lens_t, only, **kw_i)
        ref = run(monkeypatch, "torch", q, kc, vc, kcmp, vcmp, lens_t, only, **kw_i)
        assert_close(f"o {GATES[i]} only", out.float(), ref.float(), tol)


@pytest.mark.gpu
def test_gpu_selection_and_parallel_last_query(monkeypatch):
    """At 4K tokens: the kernel's picks equal the torch selection, and rows equal parallel_nsa's last query."""
    q, kc, vc, kcmp, vcmp, lens_t, gates = _gpu_step(4096, torch.float32)
    C = kc.shape[1]
    assert _kernel_picks(q, kc, vc, kcmp, vcmp, lens_t, C, 64, 16) == _torch_picks(q, kcmp, vcmp, lens_t, C, 64, 16)
    out = run(monkeypatch, "triton", q, kc, vc, kcmp, vcmp, lens_t, gates, block_counts=16, block_size=64,
              window_size=512)
    for n in (0, 1, 3, 4):
        L = int(lens_t[n])
        ref = parallel_nsa(q[n:n + 1], kc[n:n + 1, :L], vc[n:n + 1, :L], *[g[n:n + 1] for g in gates],
                           block_counts=16, block_size=64, window_size=512)
        assert_close(f"row {n}", out[n:n + 1], ref, 1e-4)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay(monkeypatch):
    """The Triton step captures into a CUDA graph and replays with new lengths and queries."""
    monkeypatch.setenv("FLA_BACKEND", "triton")
    q, kc, vc, kcmp, vcmp, lens_t, gates = _gpu_step(4096, torch.bfloat16)
    kw = dict(block_counts=16, block_size=64, window_size=512)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm up outside the capture
            nsa_decoding_one_step(q, kc, vc, kcmp, vcmp, lens_t, *gates, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nsa_decoding_one_step(q, kc, vc, kcmp, vcmp, lens_t, *gates, **kw)
    q.copy_(torch.randn_like(q))
    lens_t.copy_(torch.randint(1, 4097, lens_t.shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ref = nsa_decoding_one_step(q, kc, vc, kcmp, vcmp, lens_t, *gates, **kw)
    assert_close("o replayed", out.float(), ref.float(), 1e-3)
