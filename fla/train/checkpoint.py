"""Distributed Checkpoint (DCP) save / resume of a training run, in flame's layout.

Layout: ``<dump_folder>/<checkpoint.folder>/step-N/`` (a DCP directory) holding one state dict::

    {"model": {fqn: tensor},              # FLA parameter names, as in the HF export (flame's {"model": ...} nesting)
     "optimizer": {...},                  # torch.distributed.checkpoint.state_dict.get_state_dict's optimizer part
     "lr_scheduler": str,                 # JSON of LambdaLR.state_dict()
     "train_state": str,                  # JSON: step, skipped steps, tokens seen, elapsed seconds
     "dataloader": {"rank_R": str},       # JSON of each data-parallel rank's loader position
     "rng": {"rank_R": str}}              # JSON of each rank's torch / python RNG states

Model and optimizer tensors may be FSDP2 DTensors: DCP writes every shard once and reshards on load, so a checkpoint
saved with one world size loads with another (the per-rank loader / RNG entries then fall back to rank 0's if the
rank's own entry is missing). Non-tensor entries are JSON strings so that DCP stores them as opaque blobs.
A weights-only checkpoint (``checkpoint.model_weights_only`` at the end) holds ``{"model": ...}`` only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    get_model_state_dict,
    set_model_state_dict,
    set_state_dict,
)

__all__ = ["checkpoint_dir", "list_steps", "find_step", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state"]

_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dir(dump_folder: str, folder: str, step: int) -> str:
    return os.path.join(dump_folder, folder, f"step-{step}")


def list_steps(root: str) -> list[int]:
    """Steps of the complete checkpoints under ``root`` (DCP writes ``.metadata`` last), ascending."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        m = _STEP.match(name)
        if m and os.path.isfile(os.path.join(root, name, ".metadata")):
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_step(root: str, load_step: int) -> Optional[int]:
    """The step to resume from: the latest for ``load_step == -1`` (None when there is none), else ``load_step``
    (a ``FileNotFoundError`` when that checkpoint does not exist)."""
    steps = list_steps(root)
    if load_step == -1:
        return steps[-1] if steps else None
    if load_step not in steps:
        raise FileNotFoundError(f"--checkpoint.load_step {load_step}: no complete checkpoint step-{load_step} in "
                                f"{root} (found: {steps or 'none'})")
    return load_step


def rng_state() -> str:
    state = {"torch": torch.get_rng_state().tolist(), "python": _jsonable(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return json.dumps(state)


def set_rng_state(text: str) -> None:
    state = json.loads(text)
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def save_checkpoint(path: str, model, optimizer=None, scheduler=None, train_state: Optional[dict] = None,
                    dataloader=None, weights_only: bool = False, export_dtype: Optional[torch.dtype] = None) -> None:
    """Write the run's state to the DCP directory ``path`` (collective: every rank calls it)."""
    if weights_only or optimizer is None:
        model_sd = get_model_state_dict(model)
        if export_dtype is not None:
            model_sd = {k: v.to(export_dtype) for k, v in model_sd.items()}
        state: dict[str, Any] = {"model": model_sd}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        if scheduler is not None:
            state["lr_scheduler"] = json.dumps(scheduler.state_dict())
        if train_state is not None:
            state["train_state"] = json.dumps(train_state)
        rank = _rank()
        if dataloader is not None:
            state["dataloader"] = {f"rank_{rank}": json.dumps(dataloader.state_dict())}
        state["rng"] = {f"rank_{rank}": rng_state()}
    if _rank() == 0 and os.path.isdir(path):  # a stale, incomplete write of the same step
        shutil.rmtree(path, ignore_errors=True)
    if _world() > 1:
        dist.barrier()
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(state, checkpoint_id=path)


def _load(state: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=path)


def _keys(path: str) -> set[str]:
    """Top-level and ``a.b`` keys present in a DCP checkpoint (from its metadata)."""
    meta = dcp.FileSystemReader(path).read_metadata()
    return set(meta.state_dict_metadata.keys())


def load_checkpoint(path: str, model, optimizer=None, scheduler=None, dataloader=None,
                    exclude: tuple[str, ...] = ()) -> dict:
    """Restore what :func:`save_checkpoint` wrote into the (already sharded) model / optimizer / scheduler /
    loader and the RNGs; returns the train state dict (``{}`` for a weights-only checkpoint). Collective."""
    keys = _keys(path)
    weights_only = not any(k.startswith("optimizer") for k in keys)
    rank = _rank()
    if weights_only or optimizer is None or "optimizer" in exclude:
        model_sd = get_model_state_dict(model)
        _load({"model": model_sd}, path)
        set_model_state_dict(model, model_sd)
        if weights_only:
            return {}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        _load(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    extra: dict[str, Any] = {"train_state": ""}
    if scheduler is not None and "lr_scheduler" not in exclude:
        extra["lr_scheduler"] = ""
    own = lambda name: f"rank_{rank}" if f"{name}.rank_{rank}" in keys else "rank_0"  # noqa: E731
    if dataloader is not None and "dataloader" not in exclude and any(k.startswith("dataloader.") for k in keys):
        extra["dataloader"] = {own("dataloader"): ""}
    if "rng" not in exclude and any(k.startswith("rng.") for k in keys):
        extra["rng"] = {own("rng"): ""}
    _load(extra, path)
    if "lr_scheduler" in extra:
        scheduler.load_state_dict(json.loads(extra["lr_scheduler"]))
    if "dataloader" in extra:
        dataloader.load_state_dict(json.loads(next(iter(extra["dataloader"].values()))))
    if "rng" in extra:
        set_rng_state(next(iter(extra["rng"].values())))
    return json.loads(extra["train_state"]) if extra["train_state"] else {}


def full_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The unsharded model state dict on CPU (collective; rank 0 gets the tensors, other ranks an empty dict)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def prune_checkpoints(root: str, keep_latest_k: int) -> None:
    """Delete all but the ``keep_latest_k`` newest complete checkpoints (0: keep all). Rank 0 only."""
    if keep_latest_k <= 0:
        return
    for step in list_steps(root)[:-keep_latest_k]:
        shutil.rmtree(os.path.join(root, f"step-{step}"), ignore_errors=True)
