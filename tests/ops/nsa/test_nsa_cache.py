"""nsa_cache_append_one: both paths (torch; Triton under the CPU interpreter) against a per-row Python reference at odd
sizes (padding rows, rows completing a block and rows not, empty rows, a row at capacity), token-by-token appends
against pooling from scratch, no host read of device values, argument errors; on the GPU the Triton kernel against the
torch path (gpu marker)."""

import pytest
import torch

from fla.ops.nsa import mean_pool_blocks, nsa_cache_append_one
from fla.utils.testing import assert_close, forbid_host_sync

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def reference_append(k_cache, v_cache, k_cmp, v_cmp, k_new, v_new, lengths, real, block_size):
    """The definition, row by row, on copies: (k_cache, v_cache, k_cmp, v_cmp) after the append."""
    k_cache, v_cache, k_cmp, v_cmp = (t.clone() for t in (k_cache, v_cache, k_cmp, v_cmp))
    for n, L in enumerate(lengths.tolist()):
        if (real is not None and not real[n]) or L >= k_cache.shape[1]:
            continue
        for cache, cmp, new in ((k_cache, k_cmp, k_new), (v_cache, v_cmp, v_new)):
            cache[n, L] = new[n].to(cache.dtype)
            if (L + 1) % block_size == 0:
                b = (L + 1) // block_size - 1
                cmp[n, b] = cache[n, b * block_size:(b + 1) * block_size].float().mean(0).to(cmp.dtype)
    return k_cache, v_cache, k_cmp, v_cmp


def random_caches(N, C, H, DK, DV, BS, dtype, device="cpu"):
    ts = [torch.randn(N, C, H, DK), torch.randn(N, C, H, DV), torch.randn(N, C // BS, H, DK),
          torch.randn(N, C // BS, H, DV)]
    return [t.to(device=device, dtype=dtype) for t in ts]


# lengths / real of 8 rows with block_size 5 and capacity 20: an empty row, rows completing a block (4, 14, 19) and
# not (3, 7, 12), a padding row that would complete one (9), a row at capacity (20, never written)
LENGTHS = [0, 4, 9, 3, 14, 19, 7, 20]
REAL = [1, 1, 0, 1, 1, 1, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_real", [True, False], ids=["real", "all_real"])
def test_append_matches_reference(backend, dtype, with_real):
    N, C, H, DK, DV, BS = len(LENGTHS), 20, 3, 5, 7, 5
    caches = random_caches(N, C, H, DK, DV, BS, dtype)
    k_new, v_new = torch.randn(N, H, DK), torch.randn(N, H, DV)  # float32 tokens into the caches' dtype
    lengths = torch.tensor(LENGTHS, dtype=torch.int32)
    real = torch.tensor(REAL, dtype=torch.bool) if with_real else None
    expected = reference_append(*caches, k_new, v_new, lengths, real, BS)
    nsa_cache_append_one(*caches, k_new, v_new, lengths, real, BS)
    for name, got, ref in zip(["k_cache", "v_cache", "k_cmp", "v_cmp"], caches, expected):
        assert got.dtype == dtype
        if name.endswith("cache"):
            assert torch.equal(got, ref), f"{name}: raw writes differ"
        else:
            assert_close(name, got, ref, TOL[dtype])
    # blocks not completed this step are untouched, bit for bit
    touched = torch.zeros(N, C // BS, dtype=torch.bool)
    for n, L in enumerate(LENGTHS):
        if (real is None or REAL[n]) and L < C and (L + 1) % BS == 0:
            touched[n, (L + 1) // BS - 1] = True
    assert torch.equal(caches[2][~touched], expected[2][~touched])


def test_token_by_token_appends_equal_pooling_from_scratch(backend):
    """Appending one token per step (random padding steps) keeps the compressed cache equal to mean_pool_blocks of
    the raw cache, the pooling of the parallel path."""
    N, C, H, DK, DV, BS, steps = 3, 21, 1, 3, 5, 3, 16
    k_cache, v_cache = torch.zeros(N, C, H, DK), torch.zeros(N, C, H, DV)
    k_cmp, v_cmp = torch.zeros(N, C // BS, H, DK), torch.zeros(N, C // BS, H, DV)
    lengths = torch.zeros(N, dtype=torch.long)
    for _ in range(steps):
        real = torch.rand(N) < 0.8
        nsa_cache_append_one(k_cache, v_cache, k_cmp, v_cmp, torch.randn(N, H, DK), torch.randn(N, H, DV), lengths,
                             real.long(), BS)
        lengths = lengths + real
    for n, L in enumerate(lengths.tolist()):
        nb = L // BS
        assert_close(f"k_cmp row {n}", k_cmp[n, :nb], mean_pool_blocks(k_cache[n:n + 1, :L], BS)[0], 1e-6)
        assert_close(f"v_cmp row {n}", v_cmp[n, :nb], mean_pool_blocks(v_cache[n:n + 1, :L], BS)[0], 1e-6)
        assert torch.equal(k_cmp[n, nb:], torch.zeros_like(k_cmp[n, nb:]))
        assert torch.equal(k_cache[n, L:], torch.zeros_like(k_cache[n, L:]))


def test_block_size_one_and_small_capacity(backend):
    """block_size 1: every token is its own block; capacity below one block: nothing to pool."""
    caches = random_caches(2, 6, 2, 4, 4, 1, torch.float32)
    k_new, v_new, lengths = torch.randn(2, 2, 4), torch.randn(2, 2, 4), torch.tensor([0, 5])
    expected = reference_append(*caches, k_new, v_new, lengths, None, 1)
    nsa_cache_append_one(*caches, k_new, v_new, lengths, None, 1)
    for got, ref in zip(caches, expected):
        assert_close("block_size 1", got, ref, 1e-6)
    small = [torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4), torch.zeros(2, 0, 1, 4), torch.zeros(2, 0, 1, 4)]
    nsa_cache_append_one(*small, torch.ones(2, 1, 4), torch.ones(2, 1, 4), torch.tensor([2, 1]), None, 4)
    assert small[0][0, 2].eq(1).all() and small[0][1, 1].eq(1).all() and small[0].sum() == 8


def test_torch_path_reads_no_device_value_on_the_host(monkeypatch):
    monkeypatch.setenv("FLA_BACKEND", "torch")
    caches = random_caches(len(LENGTHS), 20, 3, 5, 7, 5, torch.float32)
    lengths, real = torch.tensor(LENGTHS), torch.tensor(REAL)
    k_new, v_new = torch.randn(len(LENGTHS), 3, 5), torch.randn(len(LENGTHS), 3, 7)
    with forbid_host_sync():
        nsa_cache_append_one(*caches, k_new, v_new, lengths, real, 5)
        nsa_cache_append_one(*caches, k_new, v_new, lengths + 1, None, 5)


def test_argument_errors():
    N, C, H, D, BS = 2, 8, 2, 4, 4
    good = dict(k_cache=torch.zeros(N, C, H, D), v_cache=torch.zeros(N, C, H, D), k_cmp=torch.zeros(N, 2, H, D),
                v_cmp=torch.zeros(N, 2, H, D), k_new=torch.zeros(N, H, D), v_new=torch.zeros(N, H, D),
                lengths=torch.zeros(N, dtype=torch.long), real=None, block_size=BS)
    nsa_cache_append_one(**good)
    cases = [
        (dict(k_new=torch.zeros(N, 1, H, D)), "k_new"),
        (dict(v_cache=torch.zeros(N, C + 1, H, D)), "v_cache"),
        (dict(k_cmp=torch.zeros(N, 1, H, D), v_cmp=torch.zeros(N, 1, H, D)), "NB=1"),
        (dict(lengths=torch.zeros(N)), "lengths"),
        (dict(lengths=torch.zeros(N + 1, dtype=torch.long)), "lengths"),
        (dict(real=torch.ones(N, 1, dtype=torch.long)), "real"),
        (dict(real=torch.ones(N)), "real"),
        (dict(block_size=0), "block_size"),
        (dict(k_cache=torch.zeros(N, H, C, D).transpose(1, 2)), "k_cache must be contiguous"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            nsa_cache_append_one(**{**good, **change})


# ---------------------------------------------------------------------------------------------------------------
# GPU: the Triton kernel against the torch path at realistic sizes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N, C, H, D, BS", [(8, 4096, 2, 64, 64), (5, 1000, 4, 128, 40), (3, 96, 1, 96, 1)])
def test_append_gpu(monkeypatch, dtype, N, C, H, D, BS):
    caches = random_caches(N, C, H, D, D, BS, dtype, "cuda")
    lengths = torch.randint(0, C, (N,), device="cuda")
    lengths[0] = BS - 1  # completes the first block
    lengths[1] = C - 1  # completes the last one
    lengths[2] = 0
    real = torch.rand(N, device="cuda") < 0.7
    k_new, v_new = torch.randn(N, H, D, device="cuda"), torch.randn(N, H, D, device="cuda")
    copies = [t.clone() for t in caches]
    monkeypatch.setenv("FLA_BACKEND", "torch")
    nsa_cache_append_one(*copies, k_new, v_new, lengths, real, BS)
    monkeypatch.setenv("FLA_BACKEND", "auto")
    nsa_cache_append_one(*caches, k_new, v_new, lengths, real, BS)
    for name, got, ref in zip(["k_cache", "v_cache", "k_cmp", "v_cmp"], caches, copies):
        if name.endswith("cache"):
            assert torch.equal(got, ref), f"{name}: raw writes differ"
        else:
            assert_close(name, got, ref, TOL[dtype])
