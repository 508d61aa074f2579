"""attn_decoding_one_step: both backends against naive_attn_decoding (random left padding, windows, GQA) and
against the last row of a full causal attention; validation errors."""

import pytest
import torch

from fla.ops.attn import attn_decoding_one_step, naive_attn, naive_attn_decoding
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def reference64(q, k, v, scale=None, window_size=None, seq_start=None):
    """naive_attn_decoding's math in float64."""
    B, _, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    G = HQ // H
    s = torch.einsum("bhd,bshd->bhs", q[:, 0].double(), k.double().repeat_interleave(G, 2)) * scale
    pos = torch.arange(S, device=q.device)[None]
    start = torch.zeros(B, dtype=torch.long, device=q.device) if seq_start is None else seq_start.long()
    ok = pos >= start[:, None]
    if window_size is not None:
        ok = ok & (pos > S - 1 - window_size)
    p = torch.softmax(s.masked_fill(~ok[:, None], float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bhs,bshv->bhv", p, v.double().repeat_interleave(G, 2))[:, None]


CASES = [  # (B, S, HQ, H, D, V, window, dtype)
    (3, 1, 2, 1, 32, 32, None, torch.float32),
    (4, 37, 4, 2, 32, 16, None, torch.float32),
    (3, 100, 4, 1, 16, 32, 7, torch.float32),
    (2, 64, 8, 2, 64, 64, 1, torch.float32),
    (3, 50, 4, 4, 32, 32, 1000, torch.float32),
    (2, 37, 2, 1, 48, 24, 16, torch.float32),
    (4, 100, 8, 2, 64, 64, 33, torch.bfloat16),
    (3, 64, 4, 2, 32, 32, None, torch.float16),
]


@pytest.mark.parametrize("B,S,HQ,H,D,V,window,dtype", CASES,
                         ids=[f"B{c[0]}S{c[1]}HQ{c[2]}H{c[3]}D{c[4]}V{c[5]}-w{c[6]}-{str(c[7])[6:]}" for c in CASES])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "leftpad"])
def test_decoding_matches_reference(backend, device, B, S, HQ, H, D, V, window, dtype, padded):
    q = torch.randn(B, 1, HQ, D, device=device).to(dtype)
    k = torch.randn(B, S, H, D, device=device).to(dtype)
    v = torch.randn(B, S, H, V, device=device).to(dtype)
    seq_start = torch.randint(0, S, (B,), device=device) if padded else None
    o = attn_decoding_one_step(q, k, v, window_size=window, seq_start=seq_start)
    assert o.dtype == dtype and o.shape == (B, 1, HQ, V)
    assert_close("o", o, reference64(q, k, v, None, window, seq_start), TOL[dtype])
    assert_close("o vs naive", o, naive_attn_decoding(q, k, v, None, window, seq_start), TOL[dtype])


def test_decoding_empty_row_gives_zeros(backend, device):
    q, k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 9, 1, 16), torch.randn(2, 9, 1, 16)
    q, k, v = q.to(device), k.to(device), v.to(device)
    seq_start = torch.tensor([9, 3], device=device, dtype=torch.int32)
    o = attn_decoding_one_step(q, k, v, scale=0.7, seq_start=seq_start)
    assert torch.equal(o[0], torch.zeros_like(o[0]))
    assert_close("o", o, reference64(q, k, v, 0.7, None, seq_start), 1e-5)


@pytest.mark.parametrize("window", [None, 5, 40])
def test_decoding_equals_last_row_of_full_attention(backend, device, window):
    """Row b holds a sequence of length L_b, left-padded to S with garbage; decoding its last token equals the last
    row of causal attention over the unpadded sequence."""
    B, S, HQ, H, D = 3, 48, 4, 2, 32
    lens = [48, 30, 1]
    k = torch.randn(B, S, H, D, device=device)
    v = torch.randn(B, S, H, D, device=device)
    q_all = torch.randn(B, S, HQ, D, device=device)
    seq_start = torch.tensor([S - n for n in lens], device=device)
    o = attn_decoding_one_step(q_all[:, -1:], k, v, window_size=window, seq_start=seq_start)
    for b, n in enumerate(lens):
        full = naive_attn(q_all[b:b + 1, S - n:], k[b:b + 1, S - n:], v[b:b + 1, S - n:], window_size=window)
        assert_close(f"row {b}", o[b:b + 1], full[:, -1:], 1e-5)


def test_decoding_non_contiguous_cache(backend, device):
    """A cache that is a slice of a larger buffer along S (as a preallocated cache would be)."""
    buf_k = torch.randn(2, 64, 2, 32, device=device)
    buf_v = torch.randn(2, 64, 2, 32, device=device)
    k, v = buf_k[:, :40], buf_v[:, :40]
    q = torch.randn(2, 1, 4, 32, device=device)
    o = attn_decoding_one_step(q, k, v, window_size=10)
    assert_close("o", o, reference64(q, k, v, None, 10, None), 1e-5)


@pytest.mark.parametrize("window", [None, 300])
def test_decoding_triton_gpu_blocks(monkeypatch, device, window):
    """The split kernel with GPU-like block sizes (BS 128, several splits of 512 keys), interpreted."""
    import fla.ops.attn.decoding_kernels as kernels

    monkeypatch.setenv("FLA_BACKEND", "triton")
    monkeypatch.setattr(kernels, "_config", lambda device, span, programs, bd: (128, 512))
    B, S = 3, 1500
    q = torch.randn(B, 1, 4, 64, device=device)
    k = torch.randn(B, S, 2, 64, device=device)
    v = torch.randn(B, S, 2, 64, device=device)
    seq_start = torch.tensor([0, 700, 1400], device=device)
    o = attn_decoding_one_step(q, k, v, window_size=window, seq_start=seq_start)
    assert_close("o", o, reference64(q, k, v, None, window, seq_start), 1e-5)


def test_decoding_errors(device):
    q = torch.randn(2, 1, 4, 16, device=device)
    k = torch.randn(2, 10, 2, 16, device=device)
    v = torch.randn(2, 10, 2, 16, device=device)
    with pytest.raises(ValueError, match="one token"):
        attn_decoding_one_step(q.expand(2, 2, 4, 16), k, v)
    with pytest.raises(ValueError, match="multiple"):
        attn_decoding_one_step(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="v must have shape"):
        attn_decoding_one_step(q, k, v[:, :5])
    with pytest.raises(ValueError, match="k must have shape"):
        attn_decoding_one_step(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="v has dtype"):
        attn_decoding_one_step(q, k, v.bfloat16())
    with pytest.raises(ValueError, match="window_size"):
        attn_decoding_one_step(q, k, v, window_size=0)
    with pytest.raises(ValueError, match="seq_start"):
        attn_decoding_one_step(q, k, v, seq_start=torch.zeros(3, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="seq_start"):
        attn_decoding_one_step(q, k, v, seq_start=torch.zeros(2, device=device))


# ---------------------------------------------------------------------------------------------------- GPU (H100/H200)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("S,HQ,H,D,window", [(4096, 16, 16, 64, None), (4096, 32, 8, 128, 768),
                                             (16384, 16, 2, 64, 1024), (1000, 8, 2, 128, None)])
def test_decoding_gpu(backend, S, HQ, H, D, window, dtype):
    B = 8
    q = torch.randn(B, 1, HQ, D, device="cuda").to(dtype)
    k = torch.randn(B, S, H, D, device="cuda").to(dtype)
    v = torch.randn(B, S, H, D, device="cuda").to(dtype)
    seq_start = torch.randint(0, S, (B,), device="cuda")
    o = attn_decoding_one_step(q, k, v, window_size=window, seq_start=seq_start)
    assert_close("o", o, reference64(q, k, v, None, window, seq_start), TOL[dtype] if dtype != torch.float32 else 1e-5)
