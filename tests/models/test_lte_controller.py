"""LTE sparsity controller: buffers, the L1 loss, the EMA of kept tokens, the multiplicative lambda update (checked
against values worked out by hand from the spec), sharing modes, warm-up / freeze, metrics, the all-reduce and
errors."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from fla.layers.lte_router import LTERouter, RoutingStats
from fla.models import lte_controller as ctl
from fla.models.lte_controller import LTESparsityController, all_reduce_mean, lte_buffers

H = 2
SEQ_LEN = 20
CONFIG = dict(
    buffer_size=10, l1_warmup_steps=0, routing_freeze_steps=0, l1_lambda_initial_steps=0, l1_lambda_update_steps=4,
    l1_lambda_tolerate=[0.9, 1.0], l1_alpha=1.5, l1_alpha_neg=2.0, l1_lambda_init=1e-3, l1_lambda_min=1e-4,
    l1_lambda_max=1e-2, l1_lambda_shared="head",
)
# With these numbers: "large" = kept > 9, "small" = kept < 10, so kept = 12 is over budget, 9.5 inside the band,
# 9 and 5 under; the EMA weight is 2 / (1 + floor(4 / 2)) = 2 / 3.


class Layer(nn.Module):
    def __init__(self, layer_idx, routing_grad=True):
        super().__init__()
        self.layer_idx = layer_idx
        self.router = LTERouter(H, 4, [3], [1], routing_grad=routing_grad)


class FakeModel(nn.Module):
    """Two LTE layers (absolute indices 1 and 3) and the controller's buffers on the base model."""

    def __init__(self, shared="head", routing_grad=(True, True)):
        super().__init__()
        self.model = nn.Module()
        lam, kept = lte_buffers(2, H, shared)
        self.model.register_buffer("l1_lambda", lam)
        self.model.register_buffer("num_kept", kept)
        self.model.layers = nn.ModuleList([nn.Linear(2, 2), Layer(1, routing_grad[0]), Layer(3, routing_grad[1])])


def make(shared="head", **overrides):
    model = FakeModel(shared)
    cfg = dict(CONFIG, l1_lambda_shared=shared)
    cfg.update(overrides)
    return model, LTESparsityController(model, cfg, SEQ_LEN)


def set_kept(model, values):
    model.model.num_kept.copy_(torch.tensor(values, dtype=torch.float32))


def lam(model):
    return model.model.l1_lambda


def close(t, values):
    return torch.allclose(t, torch.tensor(values, dtype=torch.float32), rtol=1e-5, atol=0)


def stats_from(scores, margin=1):
    """RoutingStats for layers 3 and 1 (deliberately out of order) from [T, H] score lists (B = 1)."""
    out = [RoutingStats(layer_idx=i, score=torch.tensor([s], dtype=torch.float32, requires_grad=True),
                        selected=torch.ones(1, len(s), H, dtype=torch.bool), margin=margin)
           for i, s in zip((1, 3), scores)]
    return out[::-1]


def test_buffers():
    for shared, shape in (("all", ()), ("layer", (5,)), ("head", (5, 3))):
        lam_, kept = lte_buffers(5, 3, shared)
        assert lam_.shape == shape and lam_.dtype == torch.float32
        assert kept.shape == (5, 3) and kept.dtype == torch.float32
    with pytest.raises(ValueError, match="l1_lambda_shared"):
        lte_buffers(5, 3, "model")
    model = FakeModel()
    assert {"model.l1_lambda", "model.num_kept"} <= set(model.state_dict())


def test_ema_weight():
    for U, alpha in ((32, 2 / 17), (4, 2 / 3), (5, 2 / 3), (1, 2.0)):
        assert abs(make(l1_lambda_update_steps=U)[1].ema_alpha - alpha) < 1e-12


def test_loss_and_keep_ratio_and_ema():
    model, c = make(l1_lambda_max=10.0)
    c.initialize(0)
    assert close(model.model.num_kept, [[20, 20], [20, 20]]) and close(lam(model), [[0, 0], [0, 0]])
    c.prepare_step(1)
    lam(model).copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    # layer 1 / layer 3, two kept positions each plus one margin position (dropped: its 9s must not count)
    st = stats_from([[[0.2, -0.1], [0.4, 0.3], [9, 9]], [[-0.3, 0.1], [0.0, 0.2], [9, 9]]])
    loss = c.loss(st)
    # lambda * relu: layer 1: 1*(0.2+0.4) + 2*(0.3) = 1.2; layer 3: 3*0 + 4*(0.1+0.2) = 1.2; mean over 8 -> 0.3
    assert abs(loss.item() - 0.3) < 1e-6 and loss.dtype == torch.float32
    loss.backward()
    by_layer = {s.layer_idx: s for s in st}
    assert torch.allclose(by_layer[3].score.grad[0, :, 1], torch.tensor([0.5, 0.5, 0.0]))  # 4 / 8, margin row 0
    assert torch.allclose(by_layer[1].score.grad[0, 0], torch.tensor([1 / 8, 0.0]))  # relu'(-0.1) = 0
    # keep ratios: layer 1 [1, 1/2], layer 3 [0, 1] (0.0 is not kept); kept = ratio * (3 - 1)
    assert close(c.keep_ratio(), [[1.0, 0.5], [0.0, 1.0]])
    c.update(1)
    # EMA: 20 / 3 + 2 / 3 * kept, kept = [[2, 1], [0, 2]]
    assert close(model.model.num_kept, [[8.0, 22 / 3], [20 / 3, 8.0]])
    # step 2: two micro-batches average their ratios; seq_len given explicitly: L' = 3 - 1
    c.prepare_step(2)
    c.loss(stats_from([[[1, 1], [1, 1], [0, 0]], [[1, 1], [1, 1], [0, 0]]]))
    c.loss(stats_from([[[-1, -1], [-1, -1], [0, 0]], [[1, 1], [-1, 1], [0, 0]]]))
    assert close(c.keep_ratio(), [[0.5, 0.5], [0.75, 1.0]])
    c.update(2, seq_len=3)
    assert close(model.model.num_kept, [[8 / 3 + 2 / 3, 22 / 9 + 2 / 3], [20 / 9 + 1.0, 8 / 3 + 4 / 3]])


def test_padding_counts_as_not_kept():
    model, c = make()
    c.initialize(0)
    score = torch.tensor([[[float("-inf"), float("-inf")], [0.3, 0.3], [0.3, -0.3], [0, 0]]])
    st = [RoutingStats(i, score.clone(), score > 0, 1) for i in (1, 3)]
    lam(model).fill_(1.0)
    assert abs(c.loss(st).item() - (0.3 + 0.3 + 0.3) / 6) < 1e-6
    assert close(c.keep_ratio(), [[2 / 3, 1 / 3], [2 / 3, 1 / 3]])


def test_multiplicative_update_head():
    model, c = make()
    c.initialize(0)
    for step in (1, 2, 3):
        c.prepare_step(step)
        c.update(step)  # no micro-batch records: num_kept and lambda stay
    assert close(lam(model), [[0, 0], [0, 0]])
    # first update (step 4 = U): lambda_init where kept > 9 (over budget or inside the band), else 0
    c.prepare_step(4)
    set_kept(model, [[12, 9.5], [5, 9]])
    c.update(4)
    assert close(lam(model), [[1e-3, 1e-3], [0, 0]])
    for step in (5, 6, 7):  # not lambda steps
        c.prepare_step(step)
        set_kept(model, [[100, 100], [100, 100]])
        c.update(step)
        assert close(lam(model), [[1e-3, 1e-3], [0, 0]])
    # x1.5 over budget; unchanged in the band; 0 stays 0 under budget; 0 over budget becomes lambda_min
    c.prepare_step(8)
    set_kept(model, [[12, 9.5], [5, 12]])
    c.update(8)
    assert close(lam(model), [[1.5e-3, 1e-3], [0, 1e-4]])
    # x1/2 under budget
    c.prepare_step(12)
    set_kept(model, [[12, 5], [5, 12]])
    c.update(12)
    assert close(lam(model), [[2.25e-3, 5e-4], [0, 1.5e-4]])
    # 1.5e-4 -> 7.5e-5 < lambda_min -> 0; 2.25e-3 -> 3.375e-3; 5e-4 -> 2.5e-4
    c.prepare_step(16)
    set_kept(model, [[12, 5], [5, 5]])
    c.update(16)
    assert close(lam(model), [[3.375e-3, 2.5e-4], [0, 0]])
    # capped at lambda_max: 3.375e-3 -> 5.0625e-3 -> 7.59375e-3 -> 1e-2 (not 1.139e-2) -> 1e-2
    for step in (20, 24, 28, 32):
        c.prepare_step(step)
        set_kept(model, [[12, 12], [5, 5]])
        c.update(step)
    assert close(lam(model)[0], [1e-2, 2.5e-4 * 1.5 ** 4])
    assert close(lam(model)[1], [0, 0])


def test_multiplicative_update_all_and_layer():
    model, c = make("all")
    c.initialize(0)
    set_kept(model, [[12, 9.5], [5, 9]])  # mean 8.875: not over 9
    c.update(4)
    assert lam(model).shape == () and lam(model).item() == 0
    set_kept(model, [[12, 12], [12, 12]])
    c.update(8)
    assert abs(lam(model).item() - 1e-4) < 1e-10  # 0 and over budget -> lambda_min
    c.update(12)
    assert abs(lam(model).item() - 1.5e-4) < 1e-10

    model, c = make("layer")
    c.initialize(0)
    set_kept(model, [[12, 9.5], [5, 9]])  # layer means 10.75, 7
    c.update(4)
    assert close(lam(model), [1e-3, 0])
    set_kept(model, [[12, 12], [9.5, 9.7]])  # 12 (over), 9.6 (band, large)
    c.update(8)
    assert close(lam(model), [1.5e-3, 1e-4])
    set_kept(model, [[9.2, 9.8], [3, 5]])  # 9.5 (band), 4 (under)
    c.update(12)
    assert close(lam(model), [1.5e-3, 0])  # band: unchanged; 1e-4 / 2 < lambda_min -> 0 (not over budget)


def test_initial_steps():
    model, c = make(l1_lambda_initial_steps=5)
    c.initialize(0)
    set_kept(model, [[12, 12], [12, 12]])
    c.update(4)  # step <= initial: no update
    assert close(lam(model), [[0, 0], [0, 0]])
    c.update(8)  # first update: 8 // 4 == 5 // 4 + 1
    assert close(lam(model), [[1e-3, 1e-3], [1e-3, 1e-3]])
    c.update(12)
    assert close(lam(model), [[1.5e-3, 1.5e-3], [1.5e-3, 1.5e-3]])
    # resume past the initial steps: the loaded lambda is kept; before them it is zeroed
    c.initialize(13)
    assert close(lam(model), [[1.5e-3, 1.5e-3], [1.5e-3, 1.5e-3]])
    c.initialize(5)
    assert close(lam(model), [[0, 0], [0, 0]])


def test_warmup_and_freeze():
    model = FakeModel(routing_grad=(True, False))
    c = LTESparsityController(model, dict(CONFIG, l1_warmup_steps=2, routing_freeze_steps=3), SEQ_LEN)
    routers = [m.router for m in model.model.layers[1:]]
    params = [p for r in routers for p in r.parameters()]
    set_kept(model, [[1, 2], [3, 4]])
    c.initialize(0)
    assert close(model.model.num_kept, [[20, 20], [20, 20]])
    for step in (1, 2):
        c.prepare_step(step)
        assert [r.enabled for r in routers] == [False, False] and [r.routing_grad for r in routers] == [False, False]
        assert not any(p.requires_grad for p in params)
        set_kept(model, [[1, 2], [3, 4]])
        c.prepare_step(step)
        assert close(model.model.num_kept, [[20, 20], [20, 20]])
    c.prepare_step(3)  # warm-up over: re-enabled, original routing_grad restored, still frozen
    assert [r.enabled for r in routers] == [True, True] and [r.routing_grad for r in routers] == [True, False]
    assert not any(p.requires_grad for p in params)
    set_kept(model, [[1, 2], [3, 4]])
    c.prepare_step(4)
    assert all(p.requires_grad for p in params)
    assert close(model.model.num_kept, [[1, 2], [3, 4]])  # no longer reset
    # the Linear is not a router: never frozen
    assert model.model.layers[0].weight.requires_grad
    # resuming mid warm-up disables again
    c.initialize(1)
    assert not routers[0].enabled and not params[0].requires_grad


def test_metrics():
    model, c = make(l1_lambda_max=10.0)
    c.initialize(0)
    c.prepare_step(4)
    lam(model).copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    c.loss(stats_from([[[0.2, -0.1], [0.4, 0.3], [9, 9]], [[-0.3, 0.1], [0.0, 0.2], [9, 9]]]))
    m3 = c.metrics(3)
    assert set(m3) == {"lte/overall_sparsity", "lte/l1_loss", "lte/l1_score", "lte_layer/sparsity_1",
                       "lte_layer/sparsity_3", "lte_layer/num_kept_1", "lte_layer/num_kept_3"}
    assert abs(m3["lte/overall_sparsity"] - 0.625) < 1e-6 and abs(m3["lte/l1_loss"] - 0.3) < 1e-6
    assert abs(m3["lte_layer/sparsity_1"] - 0.75) < 1e-6 and m3["lte_layer/num_kept_3"] == 20
    # l1_score: mean ReLU score per layer, averaged: layer 1 (0.2+0.4+0.3)/4, layer 3 (0.1+0.2)/4
    assert abs(m3["lte/l1_score"] - (0.9 / 4 + 0.3 / 4) / 2) < 1e-6
    c.update(4)
    m4 = c.metrics(4)
    assert all(isinstance(v, float) for v in m4.values())
    json.dumps(m4)
    for key in ("lte/overall_l1_lambda", "lte_layer/l1_lambda_1", "lte_head/sparsity_3/1", "lte_head/num_kept_1/0",
                "lte_head/num_kept_max_3", "lte_head/l1_lambda_1/1", "lte_head/l1_lambda_max_3"):
        assert key in m4, key
    assert m4["lte_head/sparsity_3/0"] == 0.0 and m4["lte_head/sparsity_3/1"] == 1.0
    model, c = make("all")
    c.initialize(0)
    keys = c.metrics(4)
    assert "lte/overall_l1_lambda" in keys and not any("l1_lambda_" in k for k in keys)
    assert "lte/l1_loss" not in keys  # no micro-batch this step


def test_all_reduce_mocked(monkeypatch):
    other_rank = torch.tensor([[20.0, 0.0], [10.0, 4.0]])

    def fake_all_reduce(t, op=None, group=None):
        t.add_(other_rank)

    monkeypatch.setattr(ctl.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ctl.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(ctl.dist, "all_reduce", fake_all_reduce)
    model, c = make()
    c.initialize(0)
    set_kept(model, [[4, 12], [10, 16]])  # averaged: [[12, 6], [10, 10]]
    c.update(3)  # not a lambda step: no all-reduce
    assert close(model.model.num_kept, [[4, 12], [10, 16]])
    c.update(4)
    assert close(model.model.num_kept, [[12, 6], [10, 10]])
    assert close(lam(model), [[1e-3, 0], [1e-3, 1e-3]])


def _gloo_worker(rank, world_size, port, values):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        out = all_reduce_mean(torch.tensor(values[rank]))
        assert torch.allclose(out, torch.tensor(values).mean(0)), out
        # the controller averages num_kept on lambda steps only
        model, c = make()
        c.initialize(0)
        set_kept(model, [[4, 12], [10, 16]] if rank == 0 else [[20, 0], [10, 4]])
        c.update(3)
        assert close(model.model.num_kept, [[4, 12], [10, 16]] if rank == 0 else [[20, 0], [10, 4]])
        c.update(4)
        assert close(model.model.num_kept, [[12, 6], [10, 10]]), model.model.num_kept
        assert close(lam(model), [[1e-3, 0], [1e-3, 1e-3]])
    finally:
        dist.destroy_process_group()


def test_all_reduce_gloo():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers need no re-import of fla (spawn costs ~10 s of imports on a small CPU machine)
    mp.start_processes(_gloo_worker, args=(2, port, [[1.0, 2.0, 3.0], [3.0, 6.0, 11.0]]), nprocs=2, join=True,
                       start_method="fork")


def test_all_reduce_without_distributed():
    t = torch.ones(3)
    assert all_reduce_mean(t) is t


def test_config_errors():
    model = FakeModel()
    for key in CONFIG:
        cfg = dict(CONFIG)
        del cfg[key]
        with pytest.raises(ValueError, match=key):
            LTESparsityController(model, cfg, SEQ_LEN)
    for key, value in (("l1_lambda_update_steps", 0), ("l1_lambda_tolerate", [1.0, 0.9]), ("l1_alpha", 0),
                       ("l1_lambda_shared", "model"), ("buffer_size", -1), ("l1_warmup_steps", -1)):
        with pytest.raises(ValueError, match=key):
            LTESparsityController(model, dict(CONFIG, **{key: value}), SEQ_LEN)
    with pytest.raises(ValueError, match="l1_lambda"):  # 'head' buffers with 'layer' sharing
        LTESparsityController(model, dict(CONFIG, l1_lambda_shared="layer"), SEQ_LEN)
    with pytest.raises(ValueError, match="buffer named"):
        LTESparsityController(nn.Linear(2, 2), CONFIG, SEQ_LEN)
    model.model.layers.append(Layer(5))
    with pytest.raises(ValueError, match="LTERouter"):
        LTESparsityController(model, CONFIG, SEQ_LEN)


def test_loss_errors():
    model, c = make()
    c.initialize(0)
    with pytest.raises(ValueError, match="2 LTE layers"):
        c.loss(stats_from([[[0.1, 0.1]] * 3, [[0.1, 0.1]] * 3])[:1])
    with pytest.raises(ValueError, match="too short"):
        c.loss(stats_from([[[0.1, 0.1]] * 3, [[0.1, 0.1]] * 3], margin=3))


def test_shared_stack_routers():
    """With 'all' router sharing, the frozen parameters are the one shared stack's."""
    model = FakeModel()
    stack = LTERouter.build_shared_stack(4, [3], [1])
    for layer in model.model.layers[1:]:
        layer.router = LTERouter(H, 4, [3], [1], routing_shared="all", shared_stack=stack)
    c = LTESparsityController(model, dict(CONFIG, routing_freeze_steps=1), SEQ_LEN)
    c.initialize(0)
    assert not any(p.requires_grad for p in stack.parameters())
    c.prepare_step(2)
    assert all(p.requires_grad for p in stack.parameters())
