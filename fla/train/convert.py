"""Convert a trainer checkpoint (Distributed Checkpoint folder) into a HuggingFace model folder.

    python -m fla.train.convert --checkpoint exp/run/checkpoint/step-320 --output exp/run/hf-320 \
        [--config exp/run/config.json] [--tokenizer PATH] [--dtype float32|bfloat16|float16]

By default the model config is the ``config.json`` the trainer wrote into the dump folder (two levels above the
step folder) and the tokenizer is the job's ``--model.tokenizer_path`` (from its ``job_config.toml``). The output
holds config.json, model.safetensors and the tokenizer files, as the trainer's own end-of-run export; the LTE
controller buffers (``model.l1_lambda``, ``model.num_kept``) are included. One process, CPU is enough.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

DTYPES = ("float32", "bfloat16", "float16")


def convert(checkpoint: str, output: str, config_path: Optional[str] = None, tokenizer_path: Optional[str] = None,
            dtype: str = "float32") -> None:
    """Load the model weights of ``checkpoint`` into a freshly built model and export it to ``output``."""
    import fla  # noqa: F401 - registers the model families
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fla.train.checkpoint import load_checkpoint
    from fla.train.config import ConfigError, load_toml
    from fla.train.train import _tokenizer_path, export_hf

    if not os.path.isdir(checkpoint):
        raise ConfigError(f"--checkpoint: no such checkpoint folder {checkpoint!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}; choose one of {DTYPES}")
    dump = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    config_path = config_path or os.path.join(dump, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"--config: no model config at {config_path!r} (pass the model's config.json)")
    if tokenizer_path is None:
        job = os.path.join(dump, "job_config.toml")
        if not os.path.isfile(job):
            raise ConfigError(f"--tokenizer: not given and no job_config.toml in {dump!r} to read it from")
        tokenizer_path = load_toml(job).get("model", {}).get("tokenizer_path", "default")
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_path(tokenizer_path), trust_remote_code=True)
    config = AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    load_checkpoint(checkpoint, model)
    export_hf(model, config, tokenizer, output, getattr(torch, dtype))


def main(argv: Optional[list[str]] = None) -> int:
    from fla.train.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m fla.train.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a step folder, e.g. exp/run/checkpoint/step-320")
    parser.add_argument("--output", required=True, help="the HuggingFace folder to write")
    parser.add_argument("--config", default=None, help="model config.json (default: the dump folder's)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the job's --model.tokenizer_path)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    args = parser.parse_args(argv)
    try:
        convert(args.checkpoint, args.output, args.config, args.tokenizer, args.dtype)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"HuggingFace model written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
