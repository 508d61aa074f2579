"""Model-level benchmarks: prefill latency, decode tokens/s and peak memory against context length.

Run ``python -m benchmarks.generation --help``. This module also holds the model table shared with
``benchmarks.training``: which paper config each benchmarked family uses, and how ``--quick`` shrinks it.
"""

from __future__ import annotations

import os
from typing import Dict

import torch

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# benchmark name -> paper config stem (configs/<stem>_<size>.json)
MODELS: Dict[str, str] = {
    "transformer": "transformer",
    "gdn": "gated_delta_net",
    "gdn_swa": "gated_delta_net_swa",
    "lansa": "gated_delta_net_nsa",
    "lalte": "gated_delta_net_lte",
}

# --quick: tiny shapes that keep every layer type (GDN, attention / NSA / LTE on layer 1) but run on a CPU in
# well under a second per forward
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 256, "num_heads": 4, "head_dim": 16}
TINY_ATTN = {"layers": [1], "num_heads": 4, "head_dim": 16, "window_size": 32, "block_size": 16, "block_counts": 4,
             "buffer_size": 32}


def config_path(name: str, size: str = "0.4B") -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return os.path.join(REPO_ROOT, "configs", f"{MODELS[name]}_{size}.json")


def load_config(name: str, size: str = "0.4B", tiny: bool = False):
    """The paper config of ``name`` (a key of ``MODELS``); ``tiny=True`` shrinks it for CPU smoke runs."""
    import fla  # noqa: F401 - registers the model types with transformers' Auto classes
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_path(name, size))
    if tiny:
        for key, value in TINY.items():
            if getattr(config, key, None) is not None or key in ("hidden_size", "num_hidden_layers", "vocab_size"):
                setattr(config, key, value)
        if getattr(config, "intermediate_size", None):
            config.intermediate_size = None
        attn = getattr(config, "attn", None)
        if attn:
            attn = dict(attn)
            for key, value in TINY_ATTN.items():
                if key == "layers" or key in attn:
                    attn[key] = value
            if attn.get("num_kv_heads"):
                attn["num_kv_heads"] = min(attn["num_kv_heads"], attn["num_heads"])
            config.attn = attn
    return config


def build_model(name: str, size: str = "0.4B", tiny: bool = False, device="cpu", dtype=torch.float32):
    """A randomly initialised ``AutoModelForCausalLM`` for ``name`` on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config(name, size, tiny))
    return model.to(device=device, dtype=dtype)


def num_params(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        emb = model.get_input_embeddings().weight
        n -= emb.numel()
    return n
