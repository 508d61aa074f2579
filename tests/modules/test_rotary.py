"""RotaryEmbedding / apply_rotary: both backends against an explicit float64 cos/sin reference, forward and backward."""

import pytest
import torch

from fla.modules.rotary import RotaryEmbedding, apply_rotary, rotary_inv_freq
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def ref_positions(B, T, seqlen_offset=0, cu_seqlens=None):
    """Int64 [B, T] positions written out token by token (independent of fla's index helpers)."""
    pos = torch.zeros(B, T, dtype=torch.long)
    if cu_seqlens is None:
        for b in range(B):
            off = int(seqlen_offset[b]) if isinstance(seqlen_offset, torch.Tensor) else seqlen_offset
            pos[b] = torch.arange(T) + off
        return pos
    bounds = cu_seqlens.tolist()
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        off = int(seqlen_offset[n]) if isinstance(seqlen_offset, torch.Tensor) else seqlen_offset
        pos[0, start:end] = torch.arange(end - start) + off
    return pos


def ref_rotary(x, dim, base, positions, inverse=False, interleaved=False):
    """float64 RoPE of x [B, T, H, D] on its first ``dim`` features at int positions [B, T]."""
    x = x.double()
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = positions.to(x.device).double()[..., None] * inv_freq.to(x.device)  # [B, T, dim/2]
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]
    if inverse:
        sin = -sin
    rot, rest = x[..., :dim], x[..., dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    else:
        x1, x2 = rot[..., :dim // 2], rot[..., dim // 2:]
        y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    return torch.cat([y, rest], -1)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def check_qk(rope, q, k, dtype, seqlen_offset=0, cu_seqlens=None, inverse=False):
    """Run the module on (q, k), compare outputs and gradients with the float64 reference."""
    B, T = q.shape[:2]
    q1, k1 = leaf(q), leaf(k)
    qo, ko = rope(q1, k1, seqlen_offset=seqlen_offset, cu_seqlens=cu_seqlens, inverse=inverse)
    assert qo.dtype == dtype and ko.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward([qo, ko], [dq, dk])

    pos = ref_positions(B, T, seqlen_offset if not isinstance(seqlen_offset, torch.Tensor) else seqlen_offset.cpu(),
                        cu_seqlens.cpu() if cu_seqlens is not None else None)
    q2, k2 = leaf(q), leaf(k)
    qr = ref_rotary(q2, rope.dim, rope.base, pos, inverse, rope.interleaved)
    kr = ref_rotary(k2, rope.dim, rope.base, pos, inverse, rope.interleaved)
    torch.autograd.backward([qr, kr], [dq.double(), dk.double()])
    tol = TOL[dtype]
    assert_close("q_rot", qo, qr, tol)
    assert_close("k_rot", ko, kr, tol)
    assert_close("dq", q1.grad, q2.grad, tol)
    assert_close("dk", k1.grad, k2.grad, tol)


CASES = [  # (B, T, HQ, H, D, dim, dtype, offset: int or list of per-row ints)
    (2, 7, 4, 2, 16, 16, torch.float32, 3),
    (1, 1, 2, 1, 64, 64, torch.float32, 11),
    (2, 37, 3, 1, 48, 32, torch.float32, [5, -4]),
    (3, 7, 2, 2, 64, 64, torch.bfloat16, [0, 9, -2]),
    (2, 7, 4, 2, 48, 32, torch.bfloat16, 0),
]


@pytest.mark.parametrize("B,T,HQ,H,D,dim,dtype,offset", CASES,
                         ids=[f"B{c[0]}T{c[1]}HQ{c[2]}H{c[3]}D{c[4]}dim{c[5]}-{str(c[6])[6:]}-off{c[7]}".replace(" ", "") for c in CASES])
def test_rotary_matches_reference(backend, device, B, T, HQ, H, D, dim, dtype, offset):
    rope = RotaryEmbedding(dim, base=10000.0).to(device)
    q = torch.randn(B, T, HQ, D, device=device).to(dtype)
    k = torch.randn(B, T, H, D, device=device).to(dtype)
    seqlen_offset = torch.tensor(offset, device=device) if isinstance(offset, list) else offset
    check_qk(rope, q, k, dtype, seqlen_offset)


@pytest.mark.parametrize("offset", [0, 4, [2, 0, -3]], ids=["off0", "off4", "offsets"])
def test_rotary_varlen(backend, device, offset):
    cu_seqlens = torch.tensor([0, 5, 6, 17], device=device, dtype=torch.int32)
    rope = RotaryEmbedding(32, base=500.0).to(device)
    q = torch.randn(1, 17, 4, 48, device=device)
    k = torch.randn(1, 17, 2, 48, device=device)
    seqlen_offset = torch.tensor(offset, device=device) if isinstance(offset, list) else offset
    check_qk(rope, q, k, torch.float32, seqlen_offset, cu_seqlens)


def test_rotary_varlen_equals_padded_batch(backend, device):
    """Packing three sequences gives the same rotation as running each of them alone."""
    lens = [5, 1, 11]
    rope = RotaryEmbedding(16).to(device)
    q = torch.randn(1, sum(lens), 2, 16, device=device)
    k = torch.randn(1, sum(lens), 1, 16, device=device)
    cu_seqlens = torch.tensor([0, 5, 6, 17], device=device)
    qp, kp = rope(q, k, seqlen_offset=2, cu_seqlens=cu_seqlens)
    for n in range(3):
        s, e = int(cu_seqlens[n]), int(cu_seqlens[n + 1])
        qs, ks = rope(q[:, s:e], k[:, s:e], seqlen_offset=2)
        assert_close(f"q seq {n}", qp[:, s:e], qs, 1e-6)
        assert_close(f"k seq {n}", kp[:, s:e], ks, 1e-6)


def test_rotary_inverse_flag(backend, device):
    rope = RotaryEmbedding(32).to(device)
    q, k = torch.randn(2, 7, 3, 48, device=device), torch.randn(2, 7, 1, 48, device=device)
    check_qk(rope, q, k, torch.float32, seqlen_offset=torch.tensor([1, -5], device=device), inverse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_inverse_undoes_rotation_and_derope(backend, device, dtype):
    rope = RotaryEmbedding(64).to(device)
    q = torch.randn(2, 7, 2, 64, device=device).to(dtype)
    k = torch.randn(2, 7, 1, 64, device=device).to(dtype)
    offsets = torch.tensor([3, -2], device=device)
    qr, kr = rope(q, k, seqlen_offset=offsets)
    qb, kb = rope(qr, kr, seqlen_offset=offsets, inverse=True)
    assert_close("q back", qb, q, TOL[dtype])
    assert_close("k back", kb, k, TOL[dtype])
    assert_close("derope", rope.derope(kr, seqlen_offset=offsets), k, TOL[dtype])
    # derope with packed sequences
    cu_seqlens = torch.tensor([0, 3, 7], device=device)
    _, kr = rope(q[:1], k[:1], seqlen_offset=5, cu_seqlens=cu_seqlens)
    assert_close("derope varlen", rope.derope(kr, seqlen_offset=5, cu_seqlens=cu_seqlens), k[:1], TOL[dtype])


def test_interleaved(backend, device):
    rope = RotaryEmbedding(16, interleaved=True).to(device)
    q, k = torch.randn(2, 7, 2, 24, device=device), torch.randn(2, 7, 2, 24, device=device)
    check_qk(rope, q, k, torch.float32, seqlen_offset=torch.tensor([4, -1], device=device))


def test_non_contiguous_inputs(backend, device):
    """q and k as views of a fused projection (head stride > D), and a tensor whose last dim is not contiguous."""
    rope = RotaryEmbedding(16).to(device)
    qkv = torch.randn(2, 7, 3, 3 * 24, device=device)
    q, k = qkv[..., :24], qkv[..., 24:48]
    check_qk(rope, q, k, torch.float32, seqlen_offset=2)
    x = torch.randn(2, 24, 3, 7, device=device).permute(0, 3, 2, 1)  # [2, 7, 3, 24], last-dim stride 7
    check_qk(rope, x, x[:, :, :1], torch.float32, seqlen_offset=torch.tensor([1, 0], device=device))


def test_apply_rotary_function(backend, device):
    """The public function with an explicit inv_freq; positions stay exact far from 0 (never low precision)."""
    x = torch.randn(1, 7, 2, 16, device=device).to(torch.bfloat16)
    inv_freq = rotary_inv_freq(16, 10000.0, device)
    y = apply_rotary(x, inv_freq, seqlen_offset=100_000)
    ref = ref_rotary(x, 16, 10000.0, ref_positions(1, 7, 100_000))
    # fp32 angles at position 1e5 are good to ~1e-2 rad; bf16 positions would be off by hundreds of radians
    assert_close("y", y, ref, 2e-2)
    assert y.dtype == torch.bfloat16


def test_module_buffer_not_persistent_and_survives_dtype_cast(device):
    rope = RotaryEmbedding(32, base=10000.0, device=device)
    assert "inv_freq" not in rope.state_dict()
    assert rope.inv_freq.dtype == torch.float32 and rope.inv_freq.shape == (16,)
    assert_close("inv_freq", rope.inv_freq, 1.0 / 10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64, device=device) / 32), 1e-6)
    q, k = torch.randn(1, 5, 2, 32, device=device), torch.randn(1, 5, 2, 32, device=device)
    ref = rope(q, k, seqlen_offset=1000)
    rope.to(torch.bfloat16)  # casts the float buffer; forward must not use the spoilt frequencies
    out = rope(q, k, seqlen_offset=1000)
    assert_close("q after cast", out[0], ref[0], 1e-6)
    assert rope.inv_freq.dtype == torch.float32
    with torch.device("meta"):
        meta = RotaryEmbedding(32)
    meta.to_empty(device=device)
    meta.reset_parameters()
    assert_close("reset", meta.inv_freq, RotaryEmbedding(32, device=device).inv_freq, 0.0)


def test_bad_inputs_raise_clear_errors(device):
    rope = RotaryEmbedding(32).to(device)
    q, k = torch.randn(2, 5, 2, 32, device=device), torch.randn(2, 5, 1, 32, device=device)
    with pytest.raises(ValueError, match="dim must be a positive even int"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="base must be a number > 0"):
        RotaryEmbedding(8, base=0)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        rope(q[0], k)
    with pytest.raises(ValueError, match="must share B, T and D"):
        rope(q, k[:, :4])
    with pytest.raises(ValueError, match="rotary dim .* head dim D = 16"):
        rope(q[..., :16], k[..., :16])
    with pytest.raises(ValueError, match="seqlen_offset must be an int"):
        rope(q, k, seqlen_offset=1.5)
    with pytest.raises(ValueError, match=r"seqlen_offset must have shape \[2\]"):
        rope(q, k, seqlen_offset=torch.tensor([1, 2, 3], device=device))
    with pytest.raises(ValueError, match="seqlen_offset has dtype float32"):
        rope(q, k, seqlen_offset=torch.tensor([1.0, 2.0], device=device))
    with pytest.raises(ValueError, match="batch size must be 1"):
        rope(q, k, cu_seqlens=torch.tensor([0, 5], device=device))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        rope(q[:1], k[:1], cu_seqlens=torch.tensor([0, 4], device=device))
    with pytest.raises(ValueError, match="inv_freq has dtype bfloat16"):
        apply_rotary(q, rope.inv_freq.bfloat16())
    with pytest.raises(ValueError, match="x has dtype int64"):
        apply_rotary(q.long(), rope.inv_freq)


@pytest.mark.gpu
def test_rotary_triton_large_gpu(monkeypatch):
    B, T, HQ, H, D = 2, 2048, 16, 4, 128
    rope = RotaryEmbedding(D).cuda()
    q = torch.randn(B, T, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    check_qk(rope, q, k, torch.bfloat16, seqlen_offset=torch.tensor([7, -30], device="cuda"))
    cu_seqlens = torch.tensor([0, 100, 1000, 2048, 4096], device="cuda", dtype=torch.int32)
    check_qk(rope, q.reshape(1, 2 * T, HQ, D), k.reshape(1, 2 * T, H, D), torch.bfloat16, 3, cu_seqlens)
    partial = RotaryEmbedding(64).cuda()
    check_qk(partial, q, k, torch.bfloat16, seqlen_offset=5)
    # far positions in fp32: the kernel's cos/sin must match torch's on the same fp32 angles
    x = torch.randn(2, 256, 4, 128, device="cuda")
    inv_freq = rotary_inv_freq(128, 10000.0, "cuda")
    y = apply_rotary(x, inv_freq, seqlen_offset=50_000)
    monkeypatch.setenv("FLA_BACKEND", "torch")
    assert_close("far positions", y, apply_rotary(x, inv_freq, seqlen_offset=50_000), 1e-5)
