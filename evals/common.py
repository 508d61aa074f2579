"""Pieces the evaluation scripts share: the argument error, integer checks, loading a saved model, naming it."""

from __future__ import annotations

import os
from typing import Optional

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


def model_name(path: str) -> str:
    """A short name for a model directory: ``exp/tiny-gdn-swa/hf`` -> ``tiny-gdn-swa``, ``runs/a`` -> ``a``."""
    parts = os.path.normpath(path).split(os.sep)
    return parts[-2] if len(parts) > 1 and parts[-1] in ("hf", "model", "checkpoint") else parts[-1]


def load_model(path: str, dtype: str = "float32", device: Optional[str] = None, tokenizer: Optional[str] = None):
    """``(model, tokenizer)`` from a ``save_pretrained`` directory (after ``import fla``, so fla's model types
    load), the model in eval mode on ``device`` (default: cuda if available, else cpu). ``tokenizer``: another
    tokenizer path (default: the model directory)."""
    import fla  # noqa: F401  (registers the model families with transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise EvalArgumentError(f"dtype={dtype!r}: choose from {tuple(DTYPES)}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EvalArgumentError(f"model={path!r}: not a save_pretrained directory (no config.json)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    return model, AutoTokenizer.from_pretrained(tokenizer or path)
