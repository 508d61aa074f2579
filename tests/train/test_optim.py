"""Optimizer and lr schedule: flame's warmup-stable-decay values, weight-decay groups, resume, errors."""

import math
import warnings

import pytest
import torch
from torch import nn

from fla.train.config import JobConfig, LRScheduler, Optimizer
from fla.train.optim import (
    ADAM_BETAS,
    build_lr_scheduler,
    build_optimizer,
    canonical_param_name,
    no_weight_decay_names,
)

PEAK = 1e-2


class Toy(nn.Module):
    """Linear layers, a norm, a tied embedding and two tagged vectors (like GatedDeltaNet's A_log/dt_bias)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)  # weight + bias
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # tied: one parameter, two names
        self.A_log = nn.Parameter(torch.zeros(4))
        self.dt_bias = nn.Parameter(torch.ones(4))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)

    def forward(self, x):
        h = self.norm(self.proj(self.embed(x))) * self.A_log.exp().mean() + self.dt_bias.mean()
        return self.head(h)


def sgd_opt(lr=PEAK):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def schedule(total, warmup, decay_type="linear", lr_min=0.0, decay_ratio=None, n=None):
    """Learning rates at scheduler steps 0..n (default total) as a list."""
    opt = sgd_opt()
    cfg = LRScheduler(warmup_steps=warmup, decay_type=decay_type, lr_min=lr_min, decay_ratio=decay_ratio)
    sched = build_lr_scheduler(opt, cfg, total)
    out = []
    for _ in range((total if n is None else n) + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def curve(decay_type, p):
    return {"linear": 1 - p, "sqrt": 1 - math.sqrt(p), "cosine": 0.5 * (1 + math.cos(math.pi * p))}[decay_type]


# ---------------------------------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay_type", ["linear", "sqrt", "cosine"])
@pytest.mark.parametrize("lr_min", [0.0, 0.1])
def test_schedule_key_steps(decay_type, lr_min):
    # T=20, W=4, decay right after warm-up: D = T - W = 16, S = 1 (torchtitan's virtual stable step)
    T, W, D = 20, 4, 16
    lrs = schedule(T, W, decay_type, lr_min)
    floor = lambda p: PEAK * (lr_min + (1 - lr_min) * curve(decay_type, p))  # noqa: E731
    assert lrs[0] == pytest.approx(PEAK * 1 / W)  # step 0: peak / W, not 0
    assert lrs[1] == pytest.approx(PEAK * 2 / W)  # mid warm-up
    assert lrs[W - 1] == pytest.approx(PEAK)  # last warm-up step reaches the peak
    assert lrs[W] == pytest.approx(PEAK)  # the virtual stable step
    assert lrs[W + 1] == pytest.approx(floor(1 / D))  # first decayed value
    assert lrs[12] == pytest.approx(floor(0.5))  # mid-decay: p = (12 + 1 - W - 1) / D = 1/2
    if decay_type == "cosine":
        assert lrs[12] == pytest.approx(PEAK * (1 + lr_min) / 2)
    assert lrs[T - 1] == pytest.approx(floor((D - 1) / D))  # last optimizer step: above the floor
    assert lrs[T - 1] > PEAK * lr_min
    assert lrs[T] == pytest.approx(PEAK * lr_min, abs=1e-15)  # after T scheduler steps: lr_min * peak
    assert all(a >= b - 1e-15 for a, b in zip(lrs[W:], lrs[W + 1:]))  # monotone decay
    assert all(a < b for a, b in zip(lrs[:W], lrs[1:W]))  # monotone warm-up


def test_flame_published_vectors():
    # torchtitan's own expectations at flame's pin (10 steps, 2 warm-up steps; D = 8, the decay starts at s = 3)
    wsd = schedule(10, 2, "linear", 0.0, decay_ratio=0.5, n=9)
    assert wsd == pytest.approx([PEAK * f for f in [0.5, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2]])
    cos = schedule(10, 2, "cosine", 0.0)
    assert cos[3] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi / 8)))
    assert cos[7] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * 5 / 8)))
    sq = schedule(10, 2, "sqrt", 0.0)
    assert sq[3] == pytest.approx(PEAK * (1 - math.sqrt(1 / 8)))
    assert schedule(10, 2, "linear", 0.2)[10] == pytest.approx(PEAK * 0.2)


def test_decay_ratio_stable_phase():
    # T=20, W=4, decay_ratio=0.25: D = 5, S = T + 1 - W - D = 12, so steps 4..15 hold the peak and the decay
    # occupies steps 16..20 (starting at T + 1 - D)
    T, W, D, S = 20, 4, 5, 12
    lrs = schedule(T, W, "linear", 0.1, decay_ratio=0.25)
    assert lrs[:W] == pytest.approx([PEAK * (s + 1) / W for s in range(W)])
    assert lrs[W:W + S] == pytest.approx([PEAK] * S)
    for s in range(W + S, T + 1):
        p = (s + 1 - W - S) / D
        assert lrs[s] == pytest.approx(PEAK * (0.1 + 0.9 * (1 - p))), s
    assert lrs[T] == pytest.approx(PEAK * 0.1)
    # decay_ratio=0 : stable to the end (the multiplier never leaves 1 within the horizon)
    assert schedule(T, W, "cosine", 0.1, decay_ratio=0.0)[W:T + 1] == pytest.approx([PEAK] * (T + 1 - W))
    # decay_ratio=None equals decay_ratio = (T - W) / T
    assert schedule(T, W, "sqrt", 0.1, decay_ratio=None) == pytest.approx(
        schedule(T, W, "sqrt", 0.1, decay_ratio=(T - W) / T)
    )


def test_clamping_and_edges():
    with pytest.warns(UserWarning, match="decay"):  # warm-up + decay > T: decay clamped to T - W
        lrs = schedule(10, 5, "linear", 0.0, decay_ratio=0.8, n=9)
    assert lrs == pytest.approx([PEAK * f for f in [0.2, 0.4, 0.6, 0.8, 1, 1, 0.8, 0.6, 0.4, 0.2]])
    with pytest.warns(UserWarning, match="warmup_steps"):  # warm-up longer than training: clamped to T
        lrs = schedule(5, 10, "linear", 0.3, n=7)
    assert lrs[:6] == pytest.approx([PEAK * f for f in [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]])
    assert lrs[6:] == pytest.approx([PEAK * 0.3] * 2)  # D = 0: lr_min past the horizon, no division by zero
    lrs = schedule(8, 0, "linear", 0.0)  # no warm-up: peak at once, then decay over D = 8
    assert lrs[0] == pytest.approx(PEAK)
    assert lrs[1] == pytest.approx(PEAK * (1 - 1 / 8))
    assert lrs[8] == pytest.approx(0.0, abs=1e-15)
    assert schedule(8, 2, "cosine", 0.1, n=12)[8:] == pytest.approx([PEAK * 0.1] * 5)  # flat past the horizon


def test_scheduler_resume_round_trip():
    cfg = LRScheduler(warmup_steps=3, decay_type="cosine", lr_min=0.1, decay_ratio=0.5)
    opt_a = sgd_opt()
    sched_a = build_lr_scheduler(opt_a, cfg, 12)
    for _ in range(5):
        opt_a.step()
        sched_a.step()
    state = sched_a.state_dict()
    assert state["last_epoch"] == 5
    opt_b = sgd_opt()
    sched_b = build_lr_scheduler(opt_b, cfg, 12)
    sched_b.load_state_dict(state)
    # LambdaLR restores last_epoch; lr is recomputed by the next step, exactly as after a resume in the trainer
    rest_a, rest_b = [], []
    for _ in range(8):
        opt_a.step()
        sched_a.step()
        opt_b.step()
        sched_b.step()
        rest_a.append(opt_a.param_groups[0]["lr"])
        rest_b.append(opt_b.param_groups[0]["lr"])
    assert rest_a == rest_b
    assert sched_a.get_last_lr() == sched_b.get_last_lr()


# ---------------------------------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------------------------------


def ids(params):
    return {id(p) for p in params}


def test_param_groups_and_defaults():
    model = Toy()
    with pytest.warns(UserWarning, match="fused"):  # default implementation=fused falls back on CPU
        opt = build_optimizer(model, Optimizer(name="AdamW", lr=3e-4, eps=1e-15))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert (decay["name"], no_decay["name"]) == ("decay", "no_decay")
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert ids(no_decay["params"]) == {id(model.A_log), id(model.dt_bias)}
    # biases, norm weights and embeddings keep weight decay, as in flame
    expected = [model.embed.weight, model.proj.weight, model.proj.bias, model.norm.weight, model.norm.bias]
    assert ids(decay["params"]) == ids(expected)
    every = decay["params"] + no_decay["params"]
    assert len(every) == len(ids(every))  # no duplicate (the tied head/embedding appears once)
    trainable = ids(p for p in model.parameters() if p.requires_grad)
    assert ids(every) == trainable  # nothing lost; the frozen parameter is left out
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and g["eps"] == 1e-15 and g["betas"] == ADAM_BETAS
        assert g["foreach"] is True and not g["fused"]


def test_flame_exact_single_group_and_adam():
    model = Toy()
    opt = build_optimizer(
        model, {"name": "Adam", "lr": 1e-3, "weight_decay": 0.05, "implementation": "for-loop"},
        respect_no_weight_decay=False,
    )
    assert type(opt) is torch.optim.Adam
    (group,) = opt.param_groups
    assert group["weight_decay"] == 0.05 and not group["foreach"] and not group["fused"]
    assert ids(group["params"]) == ids(p for p in model.parameters() if p.requires_grad)


def test_tags_lost_by_sharding_are_matched_by_name():
    # FSDP2's fully_shard builds new Parameter objects without the tag. Simulate it: take the names first, then
    # replace the tagged parameters by fresh untagged ones and wrap the model (activation checkpoint / compile
    # wrappers add segments to the names).
    model = Toy()
    names = no_weight_decay_names(model)
    assert names == {"A_log", "dt_bias"}
    model.A_log = nn.Parameter(model.A_log.detach().clone())
    model.dt_bias = nn.Parameter(model.dt_bias.detach().clone())
    assert not hasattr(model.A_log, "_no_weight_decay")
    wrapper = nn.Module()
    wrapper._orig_mod = model
    assert canonical_param_name("_orig_mod.layers.0._checkpoint_wrapped_module.attn.A_log") == "layers.0.attn.A_log"
    opt = build_optimizer(wrapper, Optimizer(implementation="foreach"), names)
    assert ids(opt.param_groups[1]["params"]) == {id(model.A_log), id(model.dt_bias)}
    # without the names, the untagged copies are decayed
    opt = build_optimizer(wrapper, Optimizer(implementation="foreach"))
    assert len(opt.param_groups) == 1


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_fsdp2_dtensor_parameters(tmp_path):
    # a real fully_shard on a 1-process gloo group: tags are dropped, names survive, DTensor params step fine
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Toy()
        names = no_weight_decay_names(model)
        fully_shard(model.proj)
        fully_shard(model)
        assert isinstance(model.A_log, DTensor) and not getattr(model.A_log, "_no_weight_decay", False)
        with pytest.warns(UserWarning, match="fused"):  # fused -> foreach on CPU
            opt = build_optimizer(model, Optimizer(implementation="fused"), names)
        assert ids(opt.param_groups[1]["params"]) == {id(model.A_log), id(model.dt_bias)}
        assert len(opt.param_groups[0]["params"]) == 5
        sched = build_lr_scheduler(opt, LRScheduler(warmup_steps=1), 3)
        x = torch.randint(0, 11, (2, 3))
        for _ in range(2):
            model(x).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        assert all(torch.isfinite(p.full_tensor()).all() for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_real_gated_deltanet_tags():
    from fla.layers.gated_deltanet import GatedDeltaNet

    layer = GatedDeltaNet(hidden_size=32, num_heads=2, head_dim=16)
    opt = build_optimizer(layer, Optimizer(implementation="foreach"))
    assert ids(opt.param_groups[1]["params"]) == {id(layer.A_log), id(layer.dt_bias)}
    assert no_weight_decay_names(layer) == {"A_log", "dt_bias"}


def test_optimizer_step_and_scheduler_together():
    torch.manual_seed(0)
    model = Toy()
    cfg = JobConfig()
    cfg.optimizer.implementation = "foreach"
    cfg.optimizer.lr = 1e-2
    cfg.lr_scheduler.warmup_steps = 2
    opt = build_optimizer(model, cfg.optimizer)
    sched = build_lr_scheduler(opt, cfg.lr_scheduler, 6)
    x = torch.randint(0, 11, (4, 5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(6):
        loss = model(x).logsumexp(-1).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
    assert torch.equal(model.frozen, before["frozen"])
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)  # both groups follow the schedule
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # lr_min 0 after T steps


def test_errors():
    model = Toy()
    with pytest.raises(ValueError, match="unknown optimizer 'SGD'"):
        build_optimizer(model, {"name": "SGD"})
    with pytest.raises(ValueError, match="implementation"):
        build_optimizer(model, {"name": "AdamW", "implementation": "apex"})
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), {"implementation": "foreach"})
    with pytest.raises(ValueError, match="early_step_in_backward"):
        build_optimizer(model, {"early_step_in_backward": True})
    opt = sgd_opt()
    with pytest.raises(ValueError, match="unknown decay type 'exp'"):
        build_lr_scheduler(opt, {"decay_type": "exp"}, 10)
    with pytest.raises(ValueError, match="lr_min"):
        build_lr_scheduler(opt, {"lr_min": 1.5}, 10)
    with pytest.raises(ValueError, match="decay_ratio"):
        build_lr_scheduler(opt, {"warmup_steps": 2, "decay_ratio": -0.1}, 10)
    with pytest.raises(ValueError, match="total_steps"):
        build_lr_scheduler(opt, {}, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_lr_scheduler(opt, {"warmup_steps": -1}, 10)


def test_no_warning_for_valid_cpu_foreach():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_optimizer(Toy(), Optimizer(implementation="foreach"))
        build_lr_scheduler(sgd_opt(), LRScheduler(warmup_steps=2), 10)
