"""parallel_attn: both backends (torch SDPA, Triton interpreted on CPU) against a float64 reference, forward and
gradients; windows, GQA, odd lengths, packed sequences, validation errors."""

import pytest
import torch

from fla.ops.attn import naive_attn, parallel_attn
from fla.ops.attn.naive import _attend
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def reference(q, k, v, scale=None, window_size=None, cu_seqlens=None):
    """naive_attn's math in float64 (naive_attn itself computes in float32)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        return torch.stack([_attend(q[b], k[b], v[b], scale, window_size) for b in range(q.shape[0])], 0)
    b = cu_seqlens.tolist()
    return torch.cat([_attend(q[0, s:e], k[0, s:e], v[0, s:e], scale, window_size)
                      for s, e in zip(b[:-1], b[1:])], 0)[None]


def inputs(B, T, HQ, H, D, V, dtype, device):
    q = torch.randn(B, T, HQ, D, device=device).to(dtype)
    k = torch.randn(B, T, H, D, device=device).to(dtype)
    v = torch.randn(B, T, H, V, device=device).to(dtype)
    return q, k, v


def check(q, k, v, window_size=None, cu_seqlens=None, scale=None, tol=None, fn=parallel_attn):
    tol = TOL[q.dtype] if tol is None else tol
    q1, k1, v1 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q1, k1, v1, scale=scale, window_size=window_size, cu_seqlens=cu_seqlens)
    assert o.dtype == q.dtype and o.shape == (*q.shape[:3], v.shape[-1])
    do = torch.randn_like(o)
    o.backward(do)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    o_ref = reference(q2, k2, v2, scale, window_size, cu_seqlens)
    o_ref.backward(do.double())
    assert_close("o", o, o_ref, tol)
    # window 1: each query sees only itself, so dq and dk are zero up to rounding; compare them absolutely
    atol = tol if window_size == 1 else 0.0
    assert_close("dq", q1.grad, q2.grad, tol, atol=atol)
    assert_close("dk", k1.grad, k2.grad, tol, atol=atol)
    assert_close("dv", v1.grad, v2.grad, tol)
    return o


CASES = [  # (B, T, HQ, H, D, V, window, dtype)
    (2, 1, 2, 1, 32, 32, None, torch.float32),
    (2, 37, 4, 2, 32, 16, 7, torch.float32),
    (1, 100, 4, 1, 16, 32, 64, torch.float32),
    (2, 64, 2, 2, 64, 64, 1, torch.float32),
    (1, 37, 4, 4, 32, 32, 1000, torch.float32),
    (2, 100, 2, 1, 32, 32, None, torch.float32),
    (1, 100, 8, 2, 16, 16, 37, torch.float32),
    (1, 37, 2, 1, 48, 24, 7, torch.float32),  # feature dims that are not powers of two
    (2, 37, 8, 2, 16, 16, 7, torch.bfloat16),
    (1, 100, 4, 2, 64, 64, None, torch.bfloat16),
    (1, 64, 2, 1, 32, 32, 16, torch.float16),
]


@pytest.mark.parametrize("B,T,HQ,H,D,V,window,dtype", CASES,
                         ids=[f"B{c[0]}T{c[1]}HQ{c[2]}H{c[3]}D{c[4]}V{c[5]}-w{c[6]}-{str(c[7])[6:]}" for c in CASES])
def test_parallel_attn_matches_reference(backend, device, B, T, HQ, H, D, V, window, dtype):
    q, k, v = inputs(B, T, HQ, H, D, V, dtype, device)
    check(q, k, v, window_size=window)


def test_parallel_attn_custom_scale(backend, device):
    q, k, v = inputs(1, 37, 4, 2, 32, 32, torch.float32, device)
    check(q, k, v, window_size=9, scale=0.3)


@pytest.mark.parametrize("window", [None, 7, 64])
@pytest.mark.parametrize("cu", [[0, 17, 64, 100], [0, 0, 33, 33, 100]], ids=["3seq", "with-empty"])
def test_parallel_attn_varlen(backend, device, window, cu):
    T = cu[-1]
    q, k, v = inputs(1, T, 4, 2, 32, 32, torch.float32, device)
    cu_seqlens = torch.tensor(cu, device=device, dtype=torch.int32)
    o = check(q, k, v, window_size=window, cu_seqlens=cu_seqlens)
    # packed == each sequence on its own
    for s, e in zip(cu[:-1], cu[1:]):
        if e > s:
            o_seq = parallel_attn(q[:, s:e], k[:, s:e], v[:, s:e], window_size=window)
            assert_close(f"seq {s}:{e}", o[:, s:e], o_seq, 1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_parallel_attn_varlen_many_sequences(backend, device, window):
    """More packed sequences than the torch path loops over (it then builds one block-diagonal mask)."""
    lens = torch.randint(0, 9, (24,)).tolist()
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    q, k, v = inputs(1, cu[-1], 4, 1, 16, 16, torch.float32, device)
    check(q, k, v, window_size=window, cu_seqlens=torch.tensor(cu, device=device))


@pytest.mark.parametrize("rows", [1, 16, 64])
@pytest.mark.parametrize("window,cu,dtype", [(7, None, torch.float32), (37, None, torch.float32),
                                             (1, None, torch.float32), (99, None, torch.float32),
                                             (20, [0, 45, 46, 100], torch.float32), (9, None, torch.bfloat16)])
def test_parallel_attn_torch_query_blocks(rows, window, cu, dtype):
    """The torch path's windowed attention in blocks of query rows, each over only the keys its window reaches,
    forward and gradients (GQA, a block edge inside a window, packed sequences)."""
    from functools import partial

    from fla.ops.attn.parallel import parallel_attn_torch

    q, k, v = inputs(2 if cu is None else 1, 100, 4, 2, 16, 24, dtype, "cpu")
    fn = partial(parallel_attn_torch, query_block=rows)
    check(q, k, v, window_size=window, cu_seqlens=None if cu is None else torch.tensor(cu), scale=0.25, fn=fn)


def test_parallel_attn_strided_inputs(backend, device):
    """q, k, v as views into one fused projection output (non-contiguous), gradients flowing back into it."""
    B, T, HQ, H, D = 2, 37, 4, 2, 32
    base = torch.randn(B, T, (HQ + 2 * H) * D, device=device)

    def run(fn, dtype):
        qkv = base.detach().to(dtype).clone().requires_grad_(True)
        q, k, v = qkv.split([HQ * D, H * D, H * D], -1)
        q, k, v = q.view(B, T, HQ, D), k.view(B, T, H, D), v.view(B, T, H, D)
        assert not q.is_contiguous()
        o = fn(q, k, v, window_size=11)
        o.backward(torch.ones_like(o) * torch.arange(V := D, device=device, dtype=dtype) / V)
        return o, qkv.grad

    o, g = run(parallel_attn, torch.float32)
    o_ref, g_ref = run(reference, torch.float64)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("dqkv", g, g_ref, 1e-5)


# GPU-sized tiles (BM, BN) per kernel: square, and unequal in both directions
GPU_TILES = {"square": {"fwd": (64, 64), "dkdv": (64, 64), "dq": (64, 64)},
             "unequal": {"fwd": (128, 64), "dkdv": (32, 128), "dq": (128, 32)}}


@pytest.mark.parametrize("tiles", sorted(GPU_TILES))
@pytest.mark.parametrize("window,cu", [(None, None), (50, None), (None, [0, 17, 64, 130]), (70, [0, 65, 66, 130]),
                                       (1, None), (200, [0, 3, 130])])
def test_parallel_attn_triton_gpu_blocks(monkeypatch, device, window, cu, tiles):
    """The Triton kernels with tile sizes used on the GPU, interpreted (masked and interior tile ranges)."""
    import fla.ops.attn.parallel_kernels as kernels

    monkeypatch.setenv("FLA_BACKEND", "triton")
    monkeypatch.setattr(kernels, "launch_config", lambda kernel, DK, DV, windowed=False, fp32=False: (*GPU_TILES[tiles][kernel], 4, 1))
    B = 2 if cu is None else 1
    q, k, v = inputs(B, 130, 4, 2, 64, 64, torch.bfloat16, device)
    check(q, k, v, window_size=window, cu_seqlens=None if cu is None else torch.tensor(cu, device=device))


def test_parallel_attn_naive_agrees(backend, device):
    """The public float32 reference and the op agree (sanity of the float64 reference used above)."""
    q, k, v = inputs(2, 37, 4, 2, 32, 32, torch.float32, device)
    assert_close("o", parallel_attn(q, k, v, window_size=5), naive_attn(q, k, v, window_size=5), 1e-5)


def test_parallel_attn_errors(device):
    q, k, v = inputs(1, 8, 4, 2, 16, 16, torch.float32, device)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        parallel_attn(q[0], k, v)
    with pytest.raises(ValueError, match="multiple"):
        parallel_attn(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="k must have shape"):
        parallel_attn(q, k[..., :8], v)
    with pytest.raises(ValueError, match="v must have shape"):
        parallel_attn(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match="length"):
        parallel_attn(q, k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match="k has dtype"):
        parallel_attn(q, k.half(), v)
    with pytest.raises(ValueError, match="q has dtype"):
        parallel_attn(q.long(), k, v)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window_size"):
            parallel_attn(q, k, v, window_size=bad)
    with pytest.raises(ValueError, match="scale"):
        parallel_attn(q, k, v, scale="x")
    with pytest.raises(ValueError, match="cu_seqlens"):
        parallel_attn(q, k, v, cu_seqlens=torch.tensor([0, 3, 7], device=device))
    with pytest.raises(ValueError, match="batch size must be 1"):
        parallel_attn(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                      cu_seqlens=torch.tensor([0, 8], device=device))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="k is on"):
            parallel_attn(q.cuda(), k.cpu(), v.cuda())


# ---------------------------------------------------------------------------------------------------- GPU (H100/H200)

GPU_CASES = [  # (B, T, HQ, H, D, window, varlen)
    (2, 1000, 8, 2, 64, None, False),
    (2, 1000, 8, 2, 64, 768, False),
    (2, 1000, 8, 2, 128, None, False),
    (2, 1000, 8, 2, 128, 768, False),
    (1, 2000, 8, 2, 64, None, True),
    (1, 2000, 8, 2, 128, 768, True),
    (2, 1000, 16, 16, 64, 64, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B,T,HQ,H,D,window,varlen", GPU_CASES,
                         ids=[f"B{c[0]}T{c[1]}HQ{c[2]}H{c[3]}D{c[4]}-w{c[5]}-{'varlen' if c[6] else 'dense'}"
                              for c in GPU_CASES])
def test_parallel_attn_gpu(backend, B, T, HQ, H, D, window, varlen, dtype):
    q, k, v = inputs(B, T, HQ, H, D, D, dtype, "cuda")
    cu = torch.tensor([0, 300, 301, 1250, T], device="cuda", dtype=torch.int32) if varlen else None
    check(q, k, v, window_size=window, cu_seqlens=cu, tol=TOL[dtype] if dtype != torch.float32 else 1e-4)


# ------------------------------------------------------------------------------------- compile for Hopper, without GPU

_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fla.ops.attn.parallel_kernels as P
import fla.ops.attn.decoding_kernels as Dk

def compile_sm90(fn, types, constexprs, num_warps, num_stages):
    names = fn.arg_names
    sig = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
    cst = {(names.index(n),): v for n, v in constexprs.items()}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})

ptr = {n: "*bf16" for n in ["Q", "K", "Vp", "O", "DO", "DQ", "DK_out", "DV_out"]}
ptr.update(LSE="*fp32", DELTA="*fp32", cu_seqlens="*i32", chunk_indices="*i32", qk_scale="fp32", scale="fp32")
common = dict(HQ=8, H=2, G=4, DK=128, DV=128, BM=64, BN=64, BK=128, BV=128, IS_VARLEN=True, USE_WINDOW=True,
              PRECISION="tf32")
compile_sm90(P._attn_fwd_kernel, ptr, common, 4, 2)
compile_sm90(P._attn_bwd_dkdv_kernel, ptr, common, 8, 1)
compile_sm90(P._attn_bwd_dq_kernel, ptr, common, 8, 1)
compile_sm90(P._attn_bwd_preprocess_kernel, ptr, dict(HQ=8, DV=128, BR=32, BV=128), 4, 2)
ptr.update(M_ws="*fp32", L_ws="*fp32", ACC_ws="*fp32", seq_start="*i32", VALID="*u8")
compile_sm90(Dk._attn_decoding_split_kernel, ptr, dict(HQ=16, H=4, G=4, DK=128, DV=128, BS=64, BK=128, BV=128,
                                                       HAS_START=True, USE_WINDOW=True, HAS_VALID=False), 4, 2)
compile_sm90(Dk._attn_decoding_split_kernel, ptr, dict(HQ=16, H=16, G=1, DK=64, DV=64, BS=64, BK=64, BV=64,
                                                       HAS_START=False, USE_WINDOW=False, HAS_VALID=True), 4, 3)
compile_sm90(Dk._attn_decoding_combine_kernel, ptr, dict(DV=128, BNS=16, BV=128), 4, 2)
print("COMPILED")
"""


def test_kernels_compile_for_sm90():
    """The attention kernels (forward, backward, decoding with and without LTE's valid mask) compile to sm_90 code
    with this Triton, no GPU needed (a compile check only: numerics on Hopper need the gpu-marked tests)."""
    import os
    import subprocess
    import sys

    import importlib.util

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "COMPILED" in res.stdout, res.stderr[-3000:]
