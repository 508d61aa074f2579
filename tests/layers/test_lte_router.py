"""LTE router: the reference's state-dict shapes and parameter counts, an independent float64 Conv2d re-implementation,
the receptive field, padding, packed sequences, gradient switches, init, sharing and argument errors."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fla.layers.lte_router import LTEConvolutionStack, LTERouter, RoutingStats
from fla.utils.testing import assert_close

SMALL = dict(conv_size=[3, 5], conv_dilation=[1, 2])  # receptive field 1 + 2 + 8 = 11, margin 5


def make_router(shared="head", H=3, hd=8, dtype=torch.float64, shared_stack=None, **kwargs):
    options = dict(SMALL)
    options.update(kwargs)
    if shared == "all" and shared_stack is None:
        shared_stack = LTERouter.build_shared_stack(hd, options["conv_size"], options["conv_dilation"])
    router = LTERouter(H, hd, routing_shared=shared, shared_stack=shared_stack, **options)
    return router.to(dtype).eval()


def reference_score(router, k, v, mask=None):
    """Straightforward float64 re-implementation with F.conv2d on the Conv2d-shaped parameters: the input channel of
    (head h, feature j) is h * 2 hd + j with the key's hd features first ('head'), or one row per head otherwise."""
    B, T, H, hd = k.shape
    stack = router.conv_stack
    k, v = k.double(), v.double()
    m = torch.ones(B, T, dtype=torch.float64) if mask is None else mask.double()
    if router.routing_shared == "head":
        x = torch.zeros(B, H * 2 * hd, 1, T, dtype=torch.float64)
        for h in range(H):
            for j in range(hd):
                x[:, h * 2 * hd + j, 0] = k[:, :, h, j]
                x[:, h * 2 * hd + hd + j, 0] = v[:, :, h, j]
        rows_mask = m
    else:
        x = torch.zeros(B * H, 2 * hd, 1, T, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                x[b * H + h, :hd, 0] = k[b, :, h].T
                x[b * H + h, hd:, 0] = v[b, :, h].T
        rows_mask = m.repeat_interleave(H, dim=0)
    x = x * rows_mask[:, None, None, :]
    groups = stack.num_groups
    for conv, d in zip(stack.convs, stack.conv_dilation):
        x = F.conv2d(x, conv.weight.double(), conv.bias.double(), padding="same", dilation=(1, d), groups=groups)
        x = F.silu(x * rows_mask[:, None, None, :])
    logits = F.conv2d(x, stack.proj.weight.double(), stack.proj.bias.double(), groups=groups)[:, :, 0]  # [N, G, T]
    logits = logits.reshape(B, H, T).transpose(1, 2)
    score = torch.sigmoid(logits) - 0.5 if router.routing_method == "sigmoid" else torch.relu(logits)
    return score.masked_fill(m[:, :, None] == 0, float("-inf"))


def kv(B, T, H, hd, dtype=torch.float64, requires_grad=False):
    k = torch.randn(B, T, H, hd, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, T, H, hd, dtype=dtype, requires_grad=requires_grad)
    return k, v


def randomize_biases(router):
    """The proj bias is 0.5 at init; zero it so that both signs of the score occur."""
    with torch.no_grad():
        router.conv_stack.proj.bias.zero_()


@pytest.mark.parametrize("H,expected", [(16, 518_160), (8, 259_080)])
def test_shipped_shapes_and_param_counts(H, expected):
    router = LTERouter(H, 64, [3, 3, 3], [2, 2, 2])
    shapes = {name: tuple(p.shape) for name, p in router.state_dict().items()}
    assert shapes == {
        "conv_stack.convs.0.weight": (H * 64, 128, 1, 3), "conv_stack.convs.0.bias": (H * 64,),
        "conv_stack.convs.1.weight": (H * 32, 64, 1, 3), "conv_stack.convs.1.bias": (H * 32,),
        "conv_stack.convs.2.weight": (H * 16, 32, 1, 3), "conv_stack.convs.2.bias": (H * 16,),
        "conv_stack.proj.weight": (H, 16, 1, 1), "conv_stack.proj.bias": (H,),
    }
    assert sum(p.numel() for p in router.parameters()) == expected
    assert router.receptive_field == 13 and router.margin == 6
    assert all(isinstance(c, nn.Conv2d) for c in router.conv_stack.convs)
    assert isinstance(router.conv_stack.proj, nn.Conv2d)


@pytest.mark.parametrize("shared", ["layer", "all"])
def test_shared_stack_shapes(shared):
    router = make_router(shared, H=16, hd=64, conv_size=[3, 3, 3], conv_dilation=[2, 2, 2])
    shapes = {name: tuple(p.shape) for name, p in router.state_dict().items()}
    assert shapes["conv_stack.convs.0.weight"] == (64, 128, 1, 3)
    assert shapes["conv_stack.convs.2.weight"] == (16, 32, 1, 3)
    assert shapes["conv_stack.proj.weight"] == (1, 16, 1, 1) and shapes["conv_stack.proj.bias"] == (1,)


class TinyModel(nn.Module):
    """A model-like container: builds one shared stack and hands it to every layer's router."""

    def __init__(self, num_layers=3, H=2, hd=4):
        super().__init__()
        stack = LTERouter.build_shared_stack(hd, **SMALL)
        self.routers = nn.ModuleList(LTERouter(H, hd, routing_shared="all", shared_stack=stack, **SMALL)
                                     for _ in range(num_layers))


def test_all_sharing_is_per_model():
    a, b = TinyModel(), TinyModel()
    assert all(r.conv_stack is a.routers[0].conv_stack for r in a.routers)
    assert a.routers[0].conv_stack is not b.routers[0].conv_stack
    keys = a.state_dict().keys()
    assert {f"routers.{i}.conv_stack.proj.weight" for i in range(3)} <= set(keys)
    n_stack = sum(p.numel() for p in a.routers[0].parameters())
    assert sum(p.numel() for p in a.parameters()) == n_stack  # parameters are counted once


@pytest.mark.parametrize("shared", ["head", "layer", "all"])
@pytest.mark.parametrize("method", ["sigmoid", "relu"])
def test_matches_conv2d_reference(shared, method):
    router = make_router(shared, routing_method=method)
    randomize_biases(router)
    k, v = kv(2, 37, 3, 8)
    out = router(k, v)
    assert out.dtype == torch.float32 and out.shape == (2, 37, 3)
    assert_close("score", out, reference_score(router, k, v).float(), 1e-6)
    if method == "sigmoid":
        assert bool((out > -0.5).all() and (out < 0.5).all()) and bool((out > 0).any() and (out < 0).any())
    else:
        assert bool((out >= 0).all())


def test_low_precision_input():
    router = make_router(dtype=torch.bfloat16)
    k, v = kv(1, 20, 3, 8, dtype=torch.bfloat16)
    out = router(k, v)
    assert out.dtype == torch.float32
    assert_close("bf16 score", out, reference_score(router, k, v).float(), 3e-2)


@pytest.mark.parametrize("shared", ["head", "layer"])
def test_receptive_field(shared):
    router = make_router(shared)
    assert router.receptive_field == 11 and router.margin == 5
    k, v = kv(1, 40, 3, 8)
    base = router(k, v)
    j = 20
    k2, v2 = k.clone(), v.clone()
    k2[:, j] += torch.randn_like(k2[:, j])
    v2[:, j] += torch.randn_like(v2[:, j])
    changed = (router(k2, v2) - base).abs().amax(dim=(0, 2)) > 0
    t = torch.arange(40)
    assert torch.equal(changed, (t - j).abs() <= router.margin)


@pytest.mark.parametrize("shared", ["head", "layer", "all"])
def test_left_padding(shared):
    router = make_router(shared)
    randomize_biases(router)
    T, lens = 30, [30, 17]
    k, v = kv(2, T, 3, 8)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for b, n in enumerate(lens):
        mask[b, T - n:] = True
    out = router(k, v, mask)
    assert bool(torch.isneginf(out[~mask]).all()) and bool(torch.isfinite(out[mask]).all())
    # what sits in the padding does not matter
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = 100 * torch.randn_like(k2[~mask])
    v2[~mask] = 100 * torch.randn_like(v2[~mask])
    assert torch.equal(router(k2, v2, mask), out)
    # a padded row scores like the row alone
    alone = router(k[1:, T - lens[1]:], v[1:, T - lens[1]:])
    assert_close("padded row", out[1, T - lens[1]:], alone[0], 1e-6)
    ref = reference_score(router, k, v, mask)
    assert_close("reference (real tokens)", out[mask], ref[mask].float(), 1e-6)


@pytest.mark.parametrize("shared", ["head", "layer"])
def test_packed_sequences(shared):
    router = make_router(shared)
    randomize_biases(router)
    lens = [7, 1, 25, 12]
    cu = torch.tensor([0] + lens).cumsum(0)
    k, v = kv(1, sum(lens), 3, 8, requires_grad=True)
    out = router(k, v, cu_seqlens=cu)
    assert out.shape == (1, sum(lens), 3)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        assert_close(f"sequence {n}", out[:, s:e], router(k[:, s:e], v[:, s:e]), 1e-6)
    out.sum().backward()
    assert k.grad is not None and bool(torch.isfinite(k.grad).all())


def test_packed_sequences_reject_batch():
    router = make_router()
    k, v = kv(2, 10, 3, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        router(k, v, cu_seqlens=torch.tensor([0, 10]))


def test_routing_grad_switch():
    router = make_router()
    k, v = kv(1, 16, 3, 8, requires_grad=True)
    router(k, v).sum().backward()
    assert k.grad is not None and k.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
    assert router.conv_stack.proj.weight.grad is not None
    k.grad = v.grad = None
    router.zero_grad()
    router.routing_grad = False
    router(k, v).sum().backward()
    assert k.grad is None and v.grad is None
    assert router.conv_stack.proj.weight.grad.abs().sum() > 0  # the router itself still learns


def test_enabled_does_not_change_the_score():
    router = make_router()
    k, v = kv(1, 16, 3, 8)
    a = router(k, v)
    router.enabled = False
    assert torch.equal(router(k, v), a)


def test_init():
    router = LTERouter(16, 64, [3, 3, 3], [2, 2, 2])
    stack = router.conv_stack
    assert torch.equal(stack.proj.bias, torch.full((16,), 0.5))
    w = stack.convs[0].weight
    fan_in = 128 * 3
    assert abs(w.std().item() / math.sqrt(2 / fan_in) - 1) < 0.02
    assert abs(w.mean().item()) < 0.01 * math.sqrt(2 / fan_in) * 10
    for conv, c in zip(stack.convs, stack.channels):
        assert conv.bias.abs().max().item() <= 1 / math.sqrt(c * 3)
        assert conv.bias.std().item() > 0.3 / math.sqrt(c * 3)  # uniform, not zeros
    # at init nearly every score is positive (kept)
    out = router(torch.randn(1, 64, 16, 64), torch.randn(1, 64, 16, 64))
    assert (out > 0).float().mean() > 0.5


def test_dropout_only_in_training():
    router = make_router(dropout_prob=0.5)
    k, v = kv(1, 16, 3, 8)
    a = router(k, v)
    assert torch.equal(router(k, v), a)
    router.train()
    assert not torch.equal(router(k, v), a)


def test_routing_stats():
    st = RoutingStats(layer_idx=3, score=torch.zeros(1, 4, 2), selected=torch.ones(1, 4, 2, dtype=torch.bool), margin=6)
    assert st.layer_idx == 3 and st.margin == 6


@pytest.mark.parametrize("kwargs,name", [
    (dict(conv_size=[3, 4], conv_dilation=[1, 1]), "conv_size"),
    (dict(conv_size=[3, 0], conv_dilation=[1, 1]), "conv_size"),
    (dict(conv_size=[3], conv_dilation=[1, 1]), "conv_dilation"),
    (dict(conv_size=[3, 3], conv_dilation=[1, 0]), "conv_dilation"),
    (dict(conv_size=3, conv_dilation=[1]), "conv_size"),
    (dict(routing_method="softmax"), "routing_method"),
    (dict(routing_shared="model"), "routing_shared"),
    (dict(dropout_prob=-0.1), "dropout_prob"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(head_dim=2, conv_size=[3, 3, 3], conv_dilation=[1, 1, 1]), "in_channels"),
    (dict(routing_shared="all"), "shared_stack"),
    (dict(shared_stack="stack"), "shared_stack"),
])
def test_bad_arguments(kwargs, name):
    options = dict(num_kv_heads=2, head_dim=8, conv_size=[3, 3], conv_dilation=[1, 2])
    options.update(kwargs)
    if options.get("shared_stack") == "stack":  # a fitting stack, but for 'head' sharing
        options["shared_stack"] = LTERouter.build_shared_stack(8, [3, 3], [1, 2])
    with pytest.raises(ValueError, match=name):
        LTERouter(**options)


def test_shared_stack_must_fit():
    stack = LTERouter.build_shared_stack(8, [3, 3], [1, 2])
    with pytest.raises(ValueError, match="shared_stack"):
        LTERouter(2, 16, [3, 3], [1, 2], routing_shared="all", shared_stack=stack)
    with pytest.raises(ValueError, match="shared_stack"):
        LTERouter(2, 8, [3, 3], [1, 2], routing_shared="all", shared_stack=nn.Linear(2, 2))


def test_bad_inputs():
    router = make_router()
    k, v = kv(1, 10, 3, 8)
    with pytest.raises(ValueError, match="k must be"):
        router(k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="v must"):
        router(k, v[:, :5])
    with pytest.raises(ValueError, match="mask"):
        router(k, v, torch.ones(1, 9))


def test_stack_direct_use():
    stack = LTEConvolutionStack(8, 2, [3], [1])
    out = stack(torch.randn(3, 16, 11))
    assert out.shape == (3, 2, 11)


@pytest.mark.parametrize("shared", ["head", "layer", "all"])
@pytest.mark.parametrize("method", ["sigmoid", "relu"])
def test_score_centre_equals_full_window_score(shared, method):
    """The decode step's centre-only router (convolutions without padding on the exact slices) equals the full
    forward at the centre of the window, also when the window reaches past the sequence start (left-edge rings whose
    first flags are False), with pads inside it, and gives -inf at a padded centre."""
    router = make_router(shared, routing_method=method)
    randomize_biases(router)
    RF, H, hd = router.receptive_field, 3, 8
    B = 6
    k, v = kv(B, RF, H, hd)
    mask = torch.ones(B, RF, dtype=torch.bool)
    mask[1, :3] = False  # the sequence starts 3 tokens into the window
    mask[2, : RF // 2] = False  # the centre is the first token
    mask[3] = torch.rand(RF) < 0.6
    mask[3, RF // 2] = True
    mask[4, RF // 2] = False  # a padded centre
    mask[5, : RF // 2 - 1] = False
    mask[5, -1] = False
    x = (torch.cat([k, v], -1).flatten(2) * mask[..., None]).transpose(1, 2).contiguous()  # zero where padded
    got = router.score_centre(x, mask)
    want = router(k, v, mask)[:, RF // 2]
    assert torch.isinf(got[4]).all() and (got[4] < 0).all()
    assert_close("centre score", got[torch.arange(B) != 4], want[torch.arange(B) != 4], 1e-6)  # float32 scores
    assert_close("reference", got[:4], reference_score(router, k, v, mask)[:4, RF // 2], 1e-6)
    with pytest.raises(ValueError, match="receptive_field"):
        router.score_centre(x[..., 1:], mask[:, 1:])
