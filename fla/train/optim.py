"""Optimizer and learning-rate schedule of the trainer, with flame's ``[optimizer]`` / ``[lr_scheduler]`` semantics.

Optimizer (:func:`build_optimizer`)
    flame builds ``torch.optim.Adam`` or ``torch.optim.AdamW`` with ``lr = optimizer.lr``, ``eps = optimizer.eps``,
    ``betas = (0.9, 0.95)``, ``weight_decay = 0.1`` and ``implementation`` ``fused`` / ``foreach`` / ``for-loop``.
    flame puts **every** parameter in one group: it has no exclusion list, so biases, norm weights and embeddings
    are decayed like the rest. Here:

    * ``weight_decay`` is ``optimizer.weight_decay`` (default 0.1, flame's fixed value);
    * parameters tagged ``_no_weight_decay = True`` (GatedDeltaNet's ``A_log`` and ``dt_bias``, the FLA/Mamba
      convention) go to a second group with ``weight_decay = 0``. This is the one deviation from flame, which ignores
      the tag; ``respect_no_weight_decay=False`` restores flame's single group exactly. Nothing else is excluded:
      biases and norm weights keep the weight decay, as in flame;
    * ``fused`` needs every parameter on CUDA; otherwise (CPU runs, gloo tests) it falls back to ``foreach`` with a
      warning. ``for-loop`` is neither fused nor foreach.

    FSDP2: ``fully_shard`` replaces each parameter by a new ``nn.Parameter`` wrapping a DTensor and does **not**
    carry custom attributes over, so the ``_no_weight_decay`` tags are gone after sharding (checked on torch 2.13).
    The trainer therefore calls :func:`no_weight_decay_names` on the model *before* ``fully_shard`` and passes the
    names to :func:`build_optimizer`, which it calls *after* ``fully_shard`` (the optimizer must hold the sharded
    parameters). Names are matched on the fully qualified parameter name with wrapper segments
    (``_orig_mod``, ``_checkpoint_wrapped_module``, ``_fsdp_wrapped_module``, ``module``) removed, so activation
    checkpointing and ``torch.compile`` wrappers applied in between do not break the match; tags still present on the
    parameter objects are honoured as well. Parameter identity is never used across sharding.

Schedule (:func:`build_lr_scheduler`, :func:`lr_lambda`)
    flame uses torchtitan's warmup-stable-decay ``LambdaLR`` (the version with the ``lr_min`` option and a virtual
    extra stable step). With ``W = warmup_steps`` (clamped to ``total_steps``), ``T = total_steps``,
    ``D = round(T * decay_ratio)`` clamped to ``T - W`` (``D = T - W`` when ``decay_ratio`` is None) and
    ``S = T + 1 - W - D`` stable steps, the multiplier of ``optimizer.lr`` at scheduler step ``s`` (0-based; the
    value used by optimizer step ``s + 1``) is::

        s < W:          (s + 1) / W                               # linear warm-up, 1/W at s = 0, 1 at s = W - 1
        W <= s < W + S: 1                                        # stable (at least the one virtual step)
        otherwise:      p = (s + 1 - W - S) / D                  # decay progress in (0, 1]
                        f = 1 - p | 1 - sqrt(p) | (1 + cos(pi p)) / 2   # linear | sqrt | cosine
                        lr_min + (1 - lr_min) * f

    So the warm-up starts at ``peak / W`` (not 0) and reaches the peak at its last step; the decay reaches
    ``lr_min * peak`` at ``s = T`` (the value after the last of ``T`` ``scheduler.step()`` calls); the last optimizer
    step (``s = T - 1``) runs at ``lr_min + (1 - lr_min) f(1 - 1/D)`` (the virtual step keeps it above the floor).
    ``lr_min`` is a ratio of the peak. With ``decay_ratio`` the decay occupies the last ``D`` steps (it starts at
    ``s = T + 1 - D``). Beyond flame: past the horizon (``s > T``) and with ``D = 0`` the multiplier stays at
    ``lr_min`` (torchtitan extrapolates the curve / divides by zero there); within ``0 <= s <= T`` values are
    identical.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "ADAM_BETAS",
    "OPTIMIZERS",
    "DECAY_TYPES",
    "build_optimizer",
    "build_lr_scheduler",
    "lr_lambda",
    "no_weight_decay_names",
    "canonical_param_name",
]

ADAM_BETAS = (0.9, 0.95)  # flame / torchtitan's fixed betas
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
IMPLEMENTATIONS = ("fused", "foreach", "for-loop")
DECAY_TYPES = ("linear", "sqrt", "cosine")

# module-wrapper attribute names that appear in parameter FQNs after activation checkpointing / torch.compile / FSDP1
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "module"})


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def canonical_param_name(name: str) -> str:
    """``name`` with wrapper segments (``_orig_mod``, ``_checkpoint_wrapped_module``, ...) removed."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Canonical names of the parameters tagged ``_no_weight_decay = True``.

    Call it before ``fully_shard`` (which drops the tags) and pass the result to :func:`build_optimizer`.
    """
    return {
        canonical_param_name(name)
        for name, p in model.named_parameters()
        if getattr(p, "_no_weight_decay", False)
    }


def _local_device_type(p: torch.Tensor) -> str:
    # DTensor parameters: the device of the local shard (DTensor.device is the mesh device type anyway)
    return p.device.type


def build_optimizer(
    model: nn.Module,
    optimizer_cfg: Any,
    no_weight_decay: Optional[Iterable[str]] = None,
    *,
    respect_no_weight_decay: bool = True,
) -> torch.optim.Optimizer:
    """Adam/AdamW over ``model``'s trainable parameters with flame's settings (see the module docstring).

    Args:
        model: the model, after ``fully_shard`` when FSDP2 is used (the trainer calls this after sharding, so the
            optimizer holds the DTensor parameters).
        optimizer_cfg: the ``[optimizer]`` section (:class:`fla.train.config.Optimizer` or a dict) with ``name``,
            ``lr``, ``eps``, ``weight_decay`` (default 0.1) and ``implementation`` (default ``fused``).
        no_weight_decay: canonical parameter names to exempt from weight decay, normally
            ``no_weight_decay_names(model)`` taken before sharding. Parameters still carrying
            ``_no_weight_decay = True`` are exempt too.
        respect_no_weight_decay: False gives flame's behaviour exactly (one group, everything decayed).

    Returns a ``torch.optim.Adam``/``AdamW`` with one group ``{"params": decayed, "weight_decay": wd}`` and, when any
    parameter is exempt, a second group ``{"params": exempt, "weight_decay": 0.0}``; groups carry ``"name"``
    (``"decay"`` / ``"no_decay"``). Frozen parameters (``requires_grad=False``) are left out; a parameter shared by
    several modules appears once.
    """
    name = _get(optimizer_cfg, "name", "AdamW")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    impl = _get(optimizer_cfg, "implementation", "fused")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"optimizer.implementation: unknown implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}"
        )
    lr = float(_get(optimizer_cfg, "lr", 8e-4))
    eps = float(_get(optimizer_cfg, "eps", 1e-8))
    weight_decay = float(_get(optimizer_cfg, "weight_decay", 0.1))
    if _get(optimizer_cfg, "early_step_in_backward", False):
        raise ValueError("optimizer.early_step_in_backward is not supported by this trainer")

    exempt_names = {canonical_param_name(n) for n in (no_weight_decay or ())}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for pname, p in model.named_parameters():  # named_parameters already skips shared duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        exempt = respect_no_weight_decay and (
            getattr(p, "_no_weight_decay", False) or canonical_param_name(pname) in exempt_names
        )
        (no_decay if exempt else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: the model has no trainable parameters")

    fused = impl == "fused"
    foreach = impl == "foreach"
    if fused:
        devices = {_local_device_type(p) for p in decay + no_decay}
        if devices != {"cuda"}:
            warnings.warn(
                f"optimizer.implementation=fused needs CUDA parameters (found {sorted(devices)}); "
                "using foreach instead",
                stacklevel=2,
            )
            fused, foreach = False, True

    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return OPTIMIZERS[name](
        groups,
        lr=lr,
        betas=ADAM_BETAS,
        eps=eps,
        weight_decay=weight_decay,
        fused=fused or None,
        foreach=foreach if not fused else None,
    )


def _phases(total_steps: int, warmup_steps: int, decay_ratio: Optional[float]) -> tuple[int, int, int]:
    """(warmup W, stable S, decay D) steps, torchtitan's clamping and virtual stable step included."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"lr_scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps > total_steps:
        warnings.warn(
            f"lr_scheduler.warmup_steps ({warmup_steps}) exceeds training.steps ({total_steps}); "
            f"using {total_steps}",
            stacklevel=3,
        )
        warmup_steps = total_steps
    if decay_ratio is None:
        decay_steps = total_steps - warmup_steps
    else:
        if not 0.0 <= decay_ratio <= 1.0:
            raise ValueError(f"lr_scheduler.decay_ratio must be in [0, 1] or None, got {decay_ratio}")
        decay_steps = round(total_steps * decay_ratio)
        if warmup_steps + decay_steps > total_steps:
            warnings.warn(
                f"warmup ({warmup_steps}) + decay ({decay_steps}) steps exceed training.steps ({total_steps}); "
                f"using {total_steps - warmup_steps} decay steps",
                stacklevel=3,
            )
            decay_steps = total_steps - warmup_steps
    stable_steps = total_steps + 1 - warmup_steps - decay_steps  # the +1 is torchtitan's virtual stable step
    return warmup_steps, stable_steps, decay_steps


def lr_lambda(
    step: int,
    *,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    decay_type: str,
    lr_min: float,
) -> float:
    """The multiplier of the peak lr at 0-based scheduler step ``step`` (formula in the module docstring)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step < warmup_steps + stable_steps:
        return 1.0
    if decay_steps <= 0:
        return lr_min
    progress = min(1.0, (step + 1 - warmup_steps - stable_steps) / decay_steps)
    if decay_type == "linear":
        f = 1.0 - progress
    elif decay_type == "sqrt":
        f = 1.0 - math.sqrt(progress)
    elif decay_type == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"lr_scheduler.decay_type: unknown decay type {decay_type!r}; choose one of {DECAY_TYPES}")
    return lr_min + (1.0 - lr_min) * f


class _WSDLambda:
    """Picklable multiplier function (LambdaLR stores callable objects' ``__dict__`` in its state_dict)."""

    def __init__(self, warmup_steps: int, stable_steps: int, decay_steps: int, decay_type: str, lr_min: float):
        self.warmup_steps = warmup_steps
        self.stable_steps = stable_steps
        self.decay_steps = decay_steps
        self.decay_type = decay_type
        self.lr_min = lr_min

    def __call__(self, step: int) -> float:
        return lr_lambda(
            step,
            warmup_steps=self.warmup_steps,
            stable_steps=self.stable_steps,
            decay_steps=self.decay_steps,
            decay_type=self.decay_type,
            lr_min=self.lr_min,
        )

    def __repr__(self) -> str:
        return (
            f"WSD(warmup={self.warmup_steps}, stable={self.stable_steps}, decay={self.decay_steps}, "
            f"type={self.decay_type}, lr_min={self.lr_min})"
        )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, lr_scheduler_cfg: Any, total_steps: int) -> LambdaLR:
    """flame's warmup-stable-decay ``LambdaLR`` over ``total_steps`` (``training.steps``) optimizer steps.

    ``lr_scheduler_cfg`` is the ``[lr_scheduler]`` section (:class:`fla.train.config.LRScheduler` or a dict):
    ``warmup_steps``, ``decay_ratio`` (None: decay right after warm-up), ``decay_type`` (linear/sqrt/cosine) and
    ``lr_min`` (ratio of the peak, in [0, 1]). The trainer calls ``scheduler.step()`` once after each optimizer step
    (also on skipped NaN/Inf steps, as flame does). ``state_dict``/``load_state_dict`` are LambdaLR's
    (``last_epoch`` plus the schedule parameters); resume requires the same config, as in flame.
    """
    decay_type = _get(lr_scheduler_cfg, "decay_type", "linear")
    if decay_type not in DECAY_TYPES:
        raise ValueError(
            f"lr_scheduler.decay_type: unknown decay type {decay_type!r}; choose one of {', '.join(DECAY_TYPES)}"
        )
    lr_min = float(_get(lr_scheduler_cfg, "lr_min", 0.0))
    if not 0.0 <= lr_min <= 1.0:
        raise ValueError(f"lr_scheduler.lr_min must be a ratio in [0, 1], got {lr_min}")
    warmup, stable, decay = _phases(
        int(total_steps), int(_get(lr_scheduler_cfg, "warmup_steps", 200)), _get(lr_scheduler_cfg, "decay_ratio")
    )
    return LambdaLR(optimizer, _WSDLambda(warmup, stable, decay, decay_type, lr_min))
