"""LTE router decode step (``lte_router_step``, both backends): after the step of every token p, the score of the
token p - m in the attention cache's score ring equals the router's full forward over the whole (left-padded)
sequence; the router ring holds the last R tokens in their slots; argument errors."""

import pytest
import torch

from fla.layers.lte_router import LTERouter
import fla.ops.lte.router_step as router_step
from fla.ops.lte import lte_router_step
from fla.utils.testing import assert_close

CASES = [  # (head_dim, conv_size, conv_dilation)
    (32, [3, 3], [1, 2]),  # R = 7
    (64, [3, 3, 3], [2, 2, 2]),  # the paper's stack, R = 13
    (32, [5], [1]),  # one convolution, R = 5
    (128, [3, 3, 3, 3], [1, 1, 2, 1]),  # four (the kernel's most), R = 11
]


def make_router(hd, conv_size, conv_dilation, H, shared, method, dtype):
    shared_stack = LTERouter.build_shared_stack(hd, conv_size, conv_dilation) if shared == "all" else None
    router = LTERouter(H, hd, conv_size, conv_dilation, routing_method=method, routing_shared=shared,
                       shared_stack=shared_stack)
    with torch.no_grad():  # biases away from their init so that both signs of the score occur
        for p in router.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.5)
    return router.to(dtype).eval()


def run_steps(router, k, v, real, window_size, device):
    """Feed the tokens one by one from an empty ring; returns the score written at each step's target slot and
    the final ring."""
    B, T, H, hd = k.shape
    R = router.receptive_field
    m = R // 2
    W1 = window_size + 1
    ring = torch.zeros(B, R, H * 2 * hd, dtype=k.dtype, device=device)
    ring_valid = torch.zeros(B, R, dtype=torch.bool, device=device)
    score = torch.full((B, W1 + 5, H), float("-inf"), device=device)
    written = []
    for p in range(T):
        pos = torch.full((B,), p, dtype=torch.long, device=device)
        router.decode_step(ring, ring_valid, k[:, p], v[:, p], real[:, p], pos, score, window_size)
        written.append(score[:, (p - m) % W1].clone())
    return torch.stack(written, 1), ring, ring_valid  # [B, T, H]


@pytest.mark.parametrize("hd,conv_size,conv_dilation", CASES, ids=["R7", "R13", "R5-1conv", "R11-4conv"])
@pytest.mark.parametrize("shared,method", [("head", "sigmoid"), ("layer", "relu"), ("all", "sigmoid")])
@pytest.mark.parametrize("window", ["wide", "minimal"])
def test_router_step_equals_full_forward(backend, device, hd, conv_size, conv_dilation, shared, method, window,
                                        monkeypatch):
    B, T, H = 4, 19, 2
    launches = []
    kernel = router_step._lte_router_step_triton
    monkeypatch.setattr(router_step, "_lte_router_step_triton", lambda *a: launches.append(1) or kernel(*a))
    router = make_router(hd, conv_size, conv_dilation, H, shared, method, torch.float32).to(device)
    R, m = router.receptive_field, router.margin
    k = torch.randn(B, T, H, hd, device=device)
    v = torch.randn(B, T, H, hd, device=device)
    pads = torch.tensor([0, 3, 11, T], device=device)  # the last row is all pads
    real = torch.arange(T, device=device)[None, :] >= pads[:, None]
    window_size = T + 2 if window == "wide" else m  # minimal: the score ring wraps every m + 1 tokens
    got, ring, ring_valid = run_steps(router, k, v, real, window_size, device)
    assert len(launches) == (T if backend == "triton" else 0)  # the kernel ran every step (no silent fallback)

    want = router(k, v, real)  # [B, T, H], -inf at pads
    centre = torch.full_like(got, float("-inf"))
    centre[:, m:] = want[:, :T - m]  # step p scores token p - m
    finite = torch.isfinite(centre)
    assert torch.equal(torch.isfinite(got), finite), "a real token got no score, or a pad / pre-start one did"
    assert (got[~finite] < 0).all()
    assert_close("centre score", got[finite], centre[finite], 1e-5, atol=1e-6)
    assert ((got[finite] > 0) == (centre[finite] > 0)).float().mean() > 0.999

    # the ring: token c of the last R in slot c % R, its key then its value per head, zero for pads
    for c in range(T - R, T):
        new = (torch.cat([k[:, c], v[:, c]], -1) * real[:, c, None, None]).reshape(B, -1)
        assert torch.equal(ring[:, c % R], new)
        assert torch.equal(ring_valid[:, c % R], real[:, c])


def test_router_step_errors(device):
    router = make_router(32, [3, 3], [1, 2], 2, "head", "sigmoid", torch.float32).to(device)
    B, H, hd = 2, 2, 32
    ring = torch.zeros(B, 7, H * 2 * hd, device=device)
    ring_valid = torch.zeros(B, 7, dtype=torch.bool, device=device)
    k = torch.randn(B, H, hd, device=device)
    real = torch.ones(B, dtype=torch.bool, device=device)
    pos = torch.zeros(B, dtype=torch.long, device=device)
    score = torch.full((B, 10, H), float("-inf"), device=device)
    args = router.conv_stack.centre_parameters()
    with pytest.raises(ValueError, match="receptive field"):
        lte_router_step(ring[:, :5], ring_valid[:, :5], k, k, real, pos, score, 8, *args, H)
    with pytest.raises(ValueError, match="window_size"):
        lte_router_step(ring, ring_valid, k, k, real, pos, score, 10, *args, H)
    with pytest.raises(ValueError, match="groups"):
        lte_router_step(ring, ring_valid, k, k, real, pos, score, 8, *args, 3)
    with pytest.raises(ValueError, match="ring_valid"):
        lte_router_step(ring, ring_valid.int(), k, k, real, pos, score, 8, *args, H)


@pytest.mark.gpu
@pytest.mark.parametrize("shared", ["head", "layer"])
def test_router_step_gpu_bf16(shared, monkeypatch):
    """The paper's stack at the 0.4B laLTE's decode shape (B8, 16 kv heads of 64) in bf16: the kernel against the
    torch path from the same ring, step after step."""
    B, T, H, hd = 8, 40, 16, 64
    router = make_router(hd, [3, 3, 3], [2, 2, 2], H, shared, "sigmoid", torch.bfloat16).cuda()
    monkeypatch.setenv("FLA_BACKEND", "triton")
    k = torch.randn(B, T, H, hd, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, T, H, hd, device="cuda", dtype=torch.bfloat16)
    real = torch.arange(T, device="cuda")[None, :] >= torch.arange(B, device="cuda")[:, None] * 3
    got, ring, _ = run_steps(router, k, v, real, 768, "cuda")
    monkeypatch.setenv("FLA_BACKEND", "torch")
    want, ring_t, _ = run_steps(router, k, v, real, 768, "cuda")
    assert torch.equal(ring, ring_t)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    assert_close("bf16 centre score", got[finite], want[finite], 2e-2, atol=2e-3)
