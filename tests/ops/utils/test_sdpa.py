"""fla.ops.utils.sdpa: masked SDPA per key/value head (GQA, rows that see no key) and blocked_sdpa's own backward
against float64 autograd over the same blocks (gathered keys, overlapping key ranges, odd block sizes)."""

import pytest
import torch

from fla.ops.utils.sdpa import blocked_sdpa, masked_sdpa, query_block_rows
from fla.utils.testing import assert_close


def attend64(q, k, v, mask, scale):
    """q [B, L, HQ, D], k/v [B, S, H, *], mask [B, H, L, S] -> [B, L, HQ, V] in float64; a row without keys gets 0."""
    G = q.shape[2] // k.shape[2]
    logits = torch.einsum("blhd,bshd->bhls", q.double(), k.double().repeat_interleave(G, 2)) * scale
    m = mask.repeat_interleave(G, 1)
    p = torch.softmax(logits.masked_fill(~m, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhls,bshv->blhv", p, v.double().repeat_interleave(G, 2))


def test_query_block_rows():
    assert query_block_rows(16, 8192) == 256
    assert query_block_rows(1, 100) == 1 << 18
    assert query_block_rows(10 ** 6, 10 ** 6) == 64  # never fewer than 64 rows
    for bh, keys in [(3, 1000), (16, 16384), (7, 77)]:
        rows = query_block_rows(bh, keys)
        assert rows & (rows - 1) == 0 and (rows == 64 or bh * rows * keys <= 2 ** 25 < bh * 2 * rows * keys)


@pytest.mark.parametrize("HQ,H", [(4, 2), (3, 3), (4, 1)])
def test_masked_sdpa_per_head_mask_and_empty_rows(HQ, H):
    B, L, S, D, V = 2, 13, 17, 8, 5
    q, k, v = torch.randn(B, L, HQ, D), torch.randn(B, S, H, D), torch.randn(B, S, H, V)
    mask = torch.rand(B, H, L, S) < 0.4
    mask[0, 0, 3] = False  # a row that sees nothing
    mask[1, -1, 7] = False
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = masked_sdpa(*leaves, mask, 0.3)
    do = torch.randn_like(o)
    o.backward(do)
    refs = [t.clone().double().requires_grad_(True) for t in (q, k, v)]
    o_ref = attend64(*refs, mask, 0.3)
    o_ref.backward(do.double())
    G = HQ // H
    assert torch.equal(o[0, 3, :G], torch.zeros_like(o[0, 3, :G])) and torch.equal(o[1, 7, -G:], torch.zeros(G, V))
    assert_close("o", o, o_ref, 1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), leaves, refs):
        assert_close(name, a.grad, b.grad, 1e-5)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_sdpa_matches_autograd_over_the_same_blocks(rows, dtype):
    """Random blocks: keys k[idx] (distinct positions per kv head, anywhere in the sequence) then k[lo:hi] (ranges
    that overlap from block to block), random masks; forward and q / k / v gradients."""
    B, T, HQ, H, D, V = 2, 29, 4, 2, 8, 6
    q, k, v = (torch.randn(B, T, n, d).to(dtype) for n, d in ((HQ, D), (H, D), (H, V)))
    gen = torch.Generator().manual_seed(1)
    plan = {}
    for a in range(0, T, rows):
        b = min(a + rows, T)
        lo = int(torch.randint(0, b, (1,), generator=gen))
        hi = min(T, b + int(torch.randint(0, 4, (1,), generator=gen)))
        m = int(torch.randint(0, 6, (1,), generator=gen))
        idx = torch.stack([torch.stack([torch.randperm(T, generator=gen)[:m] for _ in range(H)], -1)
                           for _ in range(B)]) if m else None
        mask = torch.rand(B, H, b - a, m + hi - lo, generator=gen) < 0.6
        plan[a] = (lo, hi, idx, mask)
    block_keys = lambda a, b: plan[a]  # noqa: E731

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = blocked_sdpa(*leaves, 0.4, rows, block_keys)
    do = torch.randn_like(o)
    o.backward(do)
    refs = [t.clone().double().requires_grad_(True) for t in (q, k, v)]
    pieces = []
    for a in range(0, T, rows):
        b = min(a + rows, T)
        lo, hi, idx, mask = plan[a]
        ks, vs = [refs[1][:, lo:hi]], [refs[2][:, lo:hi]]
        if idx is not None:
            ks.insert(0, refs[1].gather(1, idx[..., None].expand(-1, -1, -1, D)))
            vs.insert(0, refs[2].gather(1, idx[..., None].expand(-1, -1, -1, V)))
        pieces.append(attend64(refs[0][:, a:b], torch.cat(ks, 1), torch.cat(vs, 1), mask, 0.4))
    o_ref = torch.cat(pieces, 1)
    o_ref.backward(do.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert o.dtype == dtype
    assert_close("o", o, o_ref, tol)
    for name, a, b in zip(("dq", "dk", "dv"), leaves, refs):
        assert a.grad.dtype == dtype
        assert_close(name, a.grad, b.grad, tol)
