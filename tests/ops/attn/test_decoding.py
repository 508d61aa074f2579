"""attn_decoding_one_step: both backends against naive_attn_decoding (random left padding with a fully padded row,
windows, GQA groups 1 / 3 / 4 / 16, D != V) and against the last row of a full causal attention; the Triton launcher's
single-split and several-split paths forced; strided caches; validation errors."""

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


def inputs(B, S, HQ, H, D, V, dtype, device, padded=True, start_dtype=torch.long):
    """Random q, k, v; with ``padded`` a random left padding per row, row 0 fully padded (seq_start = S)."""
    q = torch.randn(B, 1, HQ, D, device=device).to(dtype)
    k = torch.randn(B, S, H, D, device=device).to(dtype)
    v = torch.randn(B, S, H, V, device=device).to(dtype)
    seq_start = None
    if padded:
        seq_start = torch.randint(0, S, (B,), device=device)
        seq_start[0] = S
        seq_start = seq_start.to(start_dtype)
    return q, k, v, seq_start


CASES = [  # (B, S, HQ, H, D, V, window, dtype)
    (3, 1, 2, 1, 32, 32, None, torch.float32),  # S = 1
    (4, 37, 4, 4, 32, 16, None, torch.float32),  # G = 1, D != V
    (3, 100, 6, 2, 16, 32, 7, torch.float32),  # G = 3, window 7
    (2, 64, 16, 1, 64, 64, 1, torch.float32),  # G = 16, window 1
    (3, 50, 4, 1, 32, 32, 1000, torch.float32),  # G = 4, window > S
    (2, 37, 2, 1, 48, 24, 16, torch.float32),  # D, V not powers of 2
    (2, 40, 8, 2, 128, 64, None, torch.float32),  # D = 128, D != V
    (2, 20, 2, 2, 256, 32, None, torch.float32),  # D = 256
    (4, 100, 8, 2, 64, 64, 33, torch.bfloat16),
    (2, 70, 6, 2, 128, 128, None, torch.bfloat16),  # G = 3, D = 128
    (3, 64, 4, 2, 32, 32, None, torch.float16),
]


@pytest.mark.parametrize("B,S,HQ,H,D,V,window,dtype", CASES,
                         ids=[f"B{c[0]}S{c[1]}HQ{c[2]}H{c[3]}D{c[4]}V{c[5]}-w{c[6]}-{str(c[7])[6:]}" for c in CASES])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "leftpad"])
def test_decoding_matches_reference(backend, device, B, S, HQ, H, D, V, window, dtype, padded):
    q, k, v, seq_start = inputs(B, S, HQ, H, D, V, dtype, device, padded)
    o = attn_decoding_one_step(q, k, v, window_size=window, seq_start=seq_start)
    assert o.dtype == dtype and o.shape == (B, 1, HQ, V)
    assert_close("o", o, reference64(q, k, v, None, window, seq_start), TOL[dtype])
    assert_close("o vs naive", o, naive_attn_decoding(q, k, v, None, window, seq_start), TOL[dtype])
    if padded:
        assert torch.equal(o[0], torch.zeros_like(o[0]))  # row 0 has no valid key


class _CountLaunches:
    """Stands in for a Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


SPLIT_CASES = [  # (B, S, HQ, H, D, V, window, dtype, seq_start dtype)
    (3, 90, 6, 2, 32, 32, None, torch.float32, torch.int32),  # G = 3
    (2, 75, 16, 1, 32, 16, 40, torch.float32, torch.long),  # G = 16, window < S
    (3, 64, 4, 4, 128, 64, 1000, torch.bfloat16, torch.int32),  # G = 1, D = 128, D != V
    (4, 1, 8, 2, 64, 64, 1, torch.float32, torch.long),  # S = 1: one split whatever is asked
]


@pytest.mark.parametrize("B,S,HQ,H,D,V,window,dtype,start_dtype", SPLIT_CASES,
                         ids=[f"B{c[0]}S{c[1]}HQ{c[2]}H{c[3]}D{c[4]}V{c[5]}-w{c[6]}-{str(c[7])[6:]}" for c in
                              SPLIT_CASES])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decoding_triton_splits(monkeypatch, device, B, S, HQ, H, D, V, window, dtype, start_dtype, num_splits):
    """The launcher's single-split path (the split kernel writes o, no combine launch) and several splits merged by
    the combine kernel; int32 and int64 seq_start are read as given."""
    import fla.ops.attn.decoding_kernels as kernels

    combine = _CountLaunches(kernels._attn_decoding_combine_kernel)
    monkeypatch.setattr(kernels, "_attn_decoding_combine_kernel", combine)
    q, k, v, seq_start = inputs(B, S, HQ, H, D, V, dtype, device, start_dtype=start_dtype)
    o = kernels.attn_decoding_fwd(q, k, v, D ** -0.5, window, seq_start, _num_splits=num_splits)
    assert combine.launches == (0 if num_splits == 1 or S == 1 else 1)
    assert o.dtype == dtype and o.shape == (B, 1, HQ, V)
    assert_close("o", o, reference64(q, k, v, None, window, seq_start), TOL[dtype])
    assert torch.equal(o[0], torch.zeros_like(o[0]))


def test_decoding_empty_rows_give_zeros(backend, device):
    q, k, v = torch.randn(3, 1, 2, 16), torch.randn(3, 9, 1, 16), torch.randn(3, 9, 1, 16)
    q, k, v = q.to(device), k.to(device), v.to(device)
    seq_start = torch.tensor([9, 3, 20], device=device, dtype=torch.int32)
    o = attn_decoding_one_step(q, k, v, scale=0.7, seq_start=seq_start)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.equal(o[2], torch.zeros_like(o[2]))
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


def test_decoding_strided_inputs(backend, device):
    """Caches that are views of larger buffers along B and S (as a preallocated cache would be), a q that is a view
    of a wider projection, and a seq_start that is a column of a matrix."""
    buf_k = torch.randn(4, 64, 2, 32, device=device)
    buf_v = torch.randn(4, 64, 2, 24, device=device)
    k, v = buf_k[::2, :40], buf_v[::2, :40]
    q = torch.randn(2, 1, 8, 32, device=device)[:, :, 2:6]
    seq_start = torch.tensor([[0, 7], [31, 2]], device=device)[:, 0]
    o = attn_decoding_one_step(q, k, v, window_size=10, seq_start=seq_start)
    assert_close("o", o, reference64(q, k, v, None, 10, seq_start), 1e-5)
    o = attn_decoding_one_step(q, k, v)
    assert_close("o", o, reference64(q, k, v), 1e-5)


@pytest.mark.parametrize("window", [None, 300])
def test_decoding_triton_gpu_blocks(monkeypatch, device, window):
    """The split kernel with the GPU's blocks (64 keys) over several splits, interpreted."""
    import fla.ops.attn.decoding_kernels as kernels

    monkeypatch.setattr(kernels, "_tiles", lambda BK, BV, G, fp32, interpreting: (64, 4, 1))
    B, S = 3, 1500
    q = torch.randn(B, 1, 4, 64, device=device)
    k = torch.randn(B, S, 2, 64, device=device)
    v = torch.randn(B, S, 2, 64, device=device)
    seq_start = torch.tensor([0, 700, 1400], device=device)
    o = kernels.attn_decoding_fwd(q, k, v, 0.125, window, seq_start, _num_splits=3)
    assert_close("o", o, reference64(q, k, v, 0.125, window, seq_start), 1e-5)


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

GPU_SHAPES = [  # (S, HQ, H, D, V, window)
    (4096, 16, 16, 64, 64, None), (4096, 32, 8, 128, 128, 768), (16384, 16, 2, 64, 64, 1024),
    (1000, 8, 2, 128, 128, None), (5000, 12, 4, 128, 64, None), (3000, 48, 8, 64, 64, 1),  # G = 3, 6
    (2048, 16, 1, 256, 256, None), (1, 4, 2, 64, 64, None), (777, 16, 16, 96, 80, 4096),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("S,HQ,H,D,V,window", GPU_SHAPES, ids=[f"S{c[0]}HQ{c[1]}H{c[2]}D{c[3]}V{c[4]}-w{c[5]}"
                                                                for c in GPU_SHAPES])
def test_decoding_gpu(backend, S, HQ, H, D, V, window, dtype):
    B = 8
    q, k, v, seq_start = inputs(B, S, HQ, H, D, V, dtype, "cuda")
    o = attn_decoding_one_step(q, k, v, window_size=window, seq_start=seq_start)
    assert_close("o", o, reference64(q, k, v, None, window, seq_start), TOL[dtype])
    assert torch.equal(o[0], torch.zeros_like(o[0]))
    o = attn_decoding_one_step(q, k, v, window_size=window)
    assert_close("o (no padding)", o, reference64(q, k, v, None, window, None), TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
@pytest.mark.parametrize("start_dtype", [torch.int32, torch.long], ids=["i32", "i64"])
def test_decoding_gpu_splits(num_splits, dtype, start_dtype):
    """The single-split and several-split paths on the GPU, GQA group 3 and 4, strided caches."""
    import fla.ops.attn.decoding_kernels as kernels

    for B, S, HQ, H, D, V, window in [(8, 4100, 12, 4, 64, 64, None), (4, 3000, 32, 8, 128, 64, 2000)]:
        q, k, v, seq_start = inputs(B, S + 50, HQ, H, D, V, dtype, "cuda", start_dtype=start_dtype)
        k, v, seq_start = k[:, :S], v[:, :S], seq_start.clamp(max=S)
        o = kernels.attn_decoding_fwd(q, k, v, D ** -0.5, window, seq_start, _num_splits=num_splits)
        assert_close("o", o, reference64(q, k, v, None, window, seq_start), TOL[dtype])
        assert torch.equal(o[0], torch.zeros_like(o[0]))
