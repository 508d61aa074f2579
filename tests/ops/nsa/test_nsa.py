"""parallel_nsa (torch path) and nsa_decoding_one_step against the float32 reference naive_nsa: forward, every
gradient, odd lengths, lengths not a multiple of the block, GQA groups of any size, packed sequences, T_q < T_k."""

import pytest
import torch

from fla.ops.nsa import append_compressed_blocks, mean_pool_blocks, naive_nsa, nsa_decoding_one_step, parallel_nsa
from fla.utils.testing import assert_close


def make_inputs(B, Tq, Tk, HQ, H, D, V=None, dtype=torch.float32, requires_grad=True):
    V = D if V is None else V
    q = torch.randn(B, Tq, HQ, D, dtype=dtype)
    k = torch.randn(B, Tk, H, D, dtype=dtype)
    v = torch.randn(B, Tk, H, V, dtype=dtype)
    gates = [torch.rand(B, Tq, HQ, dtype=dtype) for _ in range(3)]
    tensors = [q, k, v, *gates]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tensors


def check_against_naive(tensors, tol=1e-5, **kwargs):
    ref, ref_idx = naive_nsa(*tensors, return_block_indices=True, **kwargs)
    out, idx = parallel_nsa(*tensors, return_block_indices=True, **kwargs)
    assert torch.equal(idx.cpu(), ref_idx.cpu()), "selected blocks differ"
    assert_close("o", out, ref, tol)
    do = torch.randn_like(ref)
    names = ["q", "k", "v", "g_cmp", "g_slc", "g_swa"]
    live = [(n, t) for n, t in zip(names, tensors) if t is not None and t.requires_grad]
    g_ref = torch.autograd.grad(ref, [t for _, t in live], do)
    g_out = torch.autograd.grad(out, [t for _, t in live], do)
    for (name, _), a, b in zip(live, g_out, g_ref):
        assert_close(f"d{name}", a, b, tol)
    return idx


@pytest.mark.parametrize("B, T, HQ, H, D, BS, S, W", [
    (2, 63, 4, 2, 8, 8, 3, 10),     # odd T, T not a multiple of the block
    (1, 100, 6, 2, 16, 16, 4, 24),  # group of 3 (not a power of two)
    (1, 37, 2, 2, 8, 8, 16, 5),     # MHA, more blocks asked than exist
    (2, 64, 8, 1, 8, 16, 3, 100),   # one kv head, window longer than the sequence
])
def test_forward_backward_vs_naive(B, T, HQ, H, D, BS, S, W):
    check_against_naive(make_inputs(B, T, T, HQ, H, D), block_counts=S, block_size=BS, window_size=W)


def test_value_dim_differs_and_no_window():
    q, k, v, gc, gs, _ = make_inputs(1, 45, 45, 4, 2, 8, V=12)
    check_against_naive([q, k, v, gc, gs, None], block_counts=2, block_size=8, window_size=0)


def test_packed_sequences_equal_separate_runs():
    cu = torch.tensor([0, 17, 50, 81, 81, 90], dtype=torch.int32)
    tensors = make_inputs(1, 90, 90, 4, 2, 8)
    idx = check_against_naive(tensors, block_counts=3, block_size=8, window_size=12, cu_seqlens=cu)
    out = parallel_nsa(*tensors, block_counts=3, block_size=8, window_size=12, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            alone = parallel_nsa(*[t[:, s:e] for t in tensors], block_counts=3, block_size=8, window_size=12)
            assert_close(f"sequence {s}:{e}", out[:, s:e], alone, 1e-6)
    assert idx.shape == (1, 90, 2, 3)


@pytest.mark.parametrize("Tq", [1, 9, 40])
def test_fewer_queries_than_keys(Tq):
    Tk = 75
    tensors = make_inputs(2, Tq, Tk, 4, 2, 8)
    check_against_naive(tensors, block_counts=3, block_size=8, window_size=20)
    # queries are the last T_q tokens: the same rows of a full run over the whole sequence
    q_full = torch.randn(2, Tk, 4, 8)
    q_full[:, Tk - Tq:] = tensors[0].detach()
    gates = [torch.rand(2, Tk, 4) for _ in range(3)]
    for g, t in zip(gates, tensors[3:]):
        g[:, Tk - Tq:] = t.detach()
    full = parallel_nsa(q_full, tensors[1].detach(), tensors[2].detach(), *gates, block_counts=3, block_size=8,
                        window_size=20)
    last = parallel_nsa(*[t.detach() for t in tensors], block_counts=3, block_size=8, window_size=20)
    assert_close("last rows", last, full[:, Tk - Tq:], 1e-6)


def test_packed_pairs_of_query_and_key_offsets():
    cu_k = torch.tensor([0, 30, 30, 77], dtype=torch.int64)
    cu_q = torch.tensor([0, 5, 5, 6], dtype=torch.int64)
    tensors = make_inputs(1, 6, 77, 4, 2, 8)
    check_against_naive(tensors, block_counts=3, block_size=8, window_size=9, cu_seqlens=(cu_q, cu_k))


def test_given_block_indices():
    tensors = make_inputs(1, 50, 50, 4, 2, 8)
    idx = torch.randint(-1, 6, (1, 50, 2, 3))
    idx[..., 0] = torch.arange(50)[None, :, None] // 8  # the current block: every query has a key
    ref = naive_nsa(*tensors, block_counts=3, block_size=8, window_size=7, block_indices=idx)
    out = parallel_nsa(*tensors, block_counts=3, block_size=8, window_size=7, block_indices=idx)
    assert_close("o", out, ref, 1e-5)


def test_forced_blocks_always_selected():
    _, idx = parallel_nsa(*make_inputs(1, 200, 200, 4, 2, 8, requires_grad=False), block_counts=4, block_size=16,
                          window_size=8, return_block_indices=True)
    for t in range(200):
        ic = t // 16
        for h in range(2):
            sel = set(idx[0, t, h].tolist()) - {-1}
            assert {0, max(ic - 1, 0), ic} <= sel and max(sel) <= ic and len(sel) == min(4, ic + 1)


def test_bfloat16_close_to_reference():
    tensors = [t.detach().bfloat16().requires_grad_() for t in make_inputs(1, 40, 40, 4, 2, 16)]
    idx = naive_nsa(*[t.float() for t in tensors], block_counts=3, block_size=8, window_size=9,
                    return_block_indices=True)[1]
    ref = naive_nsa(*[t.float() for t in tensors], block_counts=3, block_size=8, window_size=9, block_indices=idx)
    out = parallel_nsa(*tensors, block_counts=3, block_size=8, window_size=9, block_indices=idx)
    assert out.dtype == torch.bfloat16
    assert_close("o", out.float(), ref, 1e-2)


def test_invalid_arguments():
    q, k, v, gc, gs, gw = make_inputs(1, 10, 10, 4, 2, 8, requires_grad=False)
    with pytest.raises(ValueError, match="multiple"):
        parallel_nsa(q[:, :, :3], k, v, None, None, None, window_size=0)
    with pytest.raises(ValueError, match="g_swa"):
        parallel_nsa(q, k, v, gc, gs, None, window_size=4)
    with pytest.raises(ValueError, match="T_q"):
        parallel_nsa(torch.cat([q, q], 1), k, v, None, None, None, window_size=0)
    with pytest.raises(ValueError, match="block_size"):
        parallel_nsa(q, k, v, gc, gs, gw, block_size=0)
    with pytest.raises(ValueError, match="g_cmp"):
        parallel_nsa(q, k, v, gc[:, :3], gs, gw)


# ---------------------------------------------------------------------------------------------------------------
# decoding


def test_incremental_compression_equals_pooling_from_scratch():
    N, C, H, D, BS = 3, 128, 2, 4, 8
    k_cache, v_cache = torch.zeros(N, C, H, D), torch.zeros(N, C, H, D)
    k_cmp, v_cmp = torch.zeros(N, C // BS, H, D), torch.zeros(N, C // BS, H, D)
    lens = torch.tensor([0, 5, 17])
    data_k, data_v = torch.randn(N, C, H, D), torch.randn(N, C, H, D)
    for n in range(N):
        k_cache[n, :lens[n]], v_cache[n, :lens[n]] = data_k[n, :lens[n]], data_v[n, :lens[n]]
    k_cmp, v_cmp = append_compressed_blocks(k_cmp, v_cmp, k_cache, v_cache, torch.zeros_like(lens), lens, BS)
    for step in range(40):
        new = lens + torch.tensor([1, 2, 1])
        for n in range(N):
            span = slice(int(lens[n]), int(new[n]))
            k_cache[n, span], v_cache[n, span] = data_k[n, span], data_v[n, span]
        k_cmp, v_cmp = append_compressed_blocks(k_cmp, v_cmp, k_cache, v_cache, lens, new, BS)
        lens = new
    for n in range(N):
        nb = int(lens[n]) // BS
        assert_close(f"k row {n}", k_cmp[n, :nb], mean_pool_blocks(data_k[n:n + 1, :nb * BS], BS)[0], 1e-6)
        assert_close(f"v row {n}", v_cmp[n, :nb], mean_pool_blocks(data_v[n:n + 1, :nb * BS], BS)[0], 1e-6)


@pytest.mark.parametrize("window_size", [0, 6, 100])
def test_decoding_step_equals_last_row_of_parallel(window_size):
    N, C, HQ, H, D, BS, S = 4, 80, 6, 2, 8, 8, 3
    lens = torch.tensor([1, 7, 8, 61])
    k_cache, v_cache = torch.randn(N, C, H, D), torch.randn(N, C, H, D + 2)
    q = torch.randn(N, 1, HQ, D)
    gates = [torch.rand(N, 1, HQ) for _ in range(3)]
    if not window_size:
        gates[2] = None
    k_cmp, v_cmp = append_compressed_blocks(torch.zeros(N, C // BS, H, D), torch.zeros(N, C // BS, H, D + 2),
                                            k_cache, v_cache, torch.zeros_like(lens), lens, BS)
    o = nsa_decoding_one_step(q, k_cache, v_cache, k_cmp, v_cmp, lens, *gates, block_counts=S, block_size=BS,
                              window_size=window_size)
    for n in range(N):
        L = int(lens[n])
        ref = naive_nsa(q[n:n + 1], k_cache[n:n + 1, :L], v_cache[n:n + 1, :L],
                        *[None if g is None else g[n:n + 1] for g in gates], block_counts=S, block_size=BS,
                        window_size=window_size)
        assert_close(f"row {n}", o[n:n + 1], ref, 1e-5)


def test_decoding_empty_row_gives_zero():
    q = torch.randn(2, 1, 2, 4)
    kc, vc = torch.randn(2, 16, 1, 4), torch.randn(2, 16, 1, 4)
    gates = [torch.rand(2, 1, 2) for _ in range(3)]
    o = nsa_decoding_one_step(q, kc, vc, torch.zeros(2, 4, 1, 4), torch.zeros(2, 4, 1, 4), torch.tensor([0, 3]),
                              *gates, block_counts=2, block_size=4, window_size=3)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and o[1].abs().sum() > 0


def test_query_chunks_of_the_torch_path(monkeypatch):
    import fla.ops.nsa.parallel as parallel
    monkeypatch.setattr(parallel, "_SCORE_ELEMENTS_PER_CHUNK", 500)  # a few queries per chunk
    check_against_naive(make_inputs(1, 21, 47, 4, 2, 8), block_counts=3, block_size=8, window_size=10)


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[4096], [5000, 64, 1, 16383]])
def test_decoding_step_gpu(lens):
    """Decoding at realistic sizes on CUDA equals the last query of a (torch-path) parallel run per row."""
    N, HQ, H, D, BS = len(lens), 32, 2, 64, 64
    C = max(lens) + 100
    dev = "cuda"
    k_cache, v_cache = torch.randn(N, C, H, D, device=dev), torch.randn(N, C, H, D, device=dev)
    lens_t = torch.tensor(lens, device=dev)
    q = torch.randn(N, 1, HQ, D, device=dev)
    gates = [torch.rand(N, 1, HQ, device=dev) for _ in range(3)]
    nb = (C + BS - 1) // BS
    k_cmp, v_cmp = append_compressed_blocks(torch.zeros(N, nb, H, D, device=dev), torch.zeros(N, nb, H, D, device=dev),
                                            k_cache, v_cache, torch.zeros_like(lens_t), lens_t, BS)
    o = nsa_decoding_one_step(q, k_cache, v_cache, k_cmp, v_cmp, lens_t, *gates, block_counts=16, block_size=BS,
                              window_size=512)
    for n, L in enumerate(lens):
        ref = parallel_nsa(q[n:n + 1], k_cache[n:n + 1, :L], v_cache[n:n + 1, :L], *[g[n:n + 1] for g in gates],
                           block_counts=16, block_size=BS, window_size=512)
        assert_close(f"row {n}", o[n:n + 1], ref, 1e-4)
