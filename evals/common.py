"""Pieces the evaluation scripts share: the argument error, integer checks, loading a saved (or freshly initialised)
model, naming it."""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EvalArgumentError(ValueError):
    """A bad argument to an evaluation; the message names the argument, its value and what is allowed."""


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an int >= ``minimum`` (bools refused), else ``EvalArgumentError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvalArgumentError(f"{name}={value!r}: must be an integer >= {minimum}")
    return value


def model_device(model) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


RANDOM_INIT = "random-init:"


def model_source(spec: str) -> Tuple[str, bool]:
    """``(directory, random_init)`` of a model argument: a ``save_pretrained`` directory, or ``random-init:DIR`` for
    DIR's configuration with fresh weights (an untrained baseline beside the trained model)."""
    if spec.startswith(RANDOM_INIT):
        return spec[len(RANDOM_INIT):], True
    return spec, False


def model_name(spec: str) -> str:
    """A short name for a model argument: ``exp/tiny-gdn-swa/hf`` -> ``tiny-gdn-swa``, ``runs/a`` -> ``a``,
    ``random-init:exp/tiny-gdn-swa/hf`` -> ``random-init-tiny-gdn-swa``."""
    path, random_init = model_source(spec)
    parts = os.path.normpath(path).split(os.sep)
    name = parts[-2] if len(parts) > 1 and parts[-1] in ("hf", "model", "checkpoint") else parts[-1]
    return f"random-init-{name}" if random_init else name


def load_model(spec: str, dtype: str = "float32", device: Optional[str] = None, tokenizer: Optional[str] = None,
               seed: int = 0):
    """``(model, tokenizer)`` from a ``save_pretrained`` directory (after ``import fla``, so fla's model types
    load), the model in eval mode on ``device`` (default: cuda if available, else cpu). ``spec`` may also be
    ``random-init:DIR``: DIR's configuration initialised afresh (``post_init``) from ``seed``, without touching the
    global random state. ``tokenizer``: another tokenizer path (default: the model directory)."""
    import fla  # noqa: F401  (registers the model families with transformers)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise EvalArgumentError(f"dtype={dtype!r}: choose from {tuple(DTYPES)}")
    path, random_init = model_source(spec)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EvalArgumentError(f"model={spec!r}: {path!r} is not a save_pretrained directory (no config.json); "
                                f"give a directory or {RANDOM_INIT}DIR")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=DTYPES[dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    return model.to(device).eval(), AutoTokenizer.from_pretrained(tokenizer or path)
