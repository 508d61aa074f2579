"""lm-eval-harness with this library's models: ``python -m evals.harness [lm-eval arguments] [--offline] [--haystack PATH]``.

Runs lm-eval's own command line (``lm_eval``; 0.4.13, see ``pyproject.toml``'s ``eval`` extra) after

- ``import fla``, which registers the model families with transformers' Auto classes, so the stock ``hf`` backend
  (lm-eval's default model) loads a saved fla model directory;
- registering ``FLALM`` with lm-eval under the model name ``fla``: the ``hf`` backend (batched generation with left
  padding and ``use_cache``) with ``backend=causal`` as default and a check that ``pretrained`` is an fla model
  (the error names the model types this library provides).

Every lm-eval argument passes through unchanged, e.g. the paper's RULER command::

    python -m evals.harness --output_path results/x/ruler --tasks niah_single_1,niah_single_2,niah_single_3 \\
        --model_args pretrained=MODEL_PATH,dtype=float32,max_length=16384,trust_remote_code=True,add_bos_token=True \\
        --metadata '{"max_seq_lengths": [1024, 2048, 4096]}' --batch_size 32 --show_config --trust_remote_code

Offline RULER (no HuggingFace hub, no nltk download): the essay-haystack NIAH tasks (``niah_single_2/3``,
``niah_multikey_1``, ``niah_multivalue``, ``niah_multiquery``) normally download Paul Graham's essays and nltk's
``punkt_tab``. With offline mode on they take their haystack from a local corpus and split sentences with a regex
(``evals/ruler_offline.py``). Offline mode is on with any of

- ``--offline`` (this script's option, removed before lm-eval parses the rest);
- ``--haystack PATH`` or ``FLA_EVAL_HAYSTACK=PATH``: the corpus (a ``.txt`` / ``.jsonl[.xz]`` file or a folder of
  them; default ``assets/corpus``, the shipped public-domain text);
- ``FLA_EVAL_OFFLINE=1``, or ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` (the hub is off anyway).

``FLA_EVAL_OFFLINE=0`` forces it off even when the HuggingFace variables are set. Scores with a local haystack are
not comparable to published RULER numbers (other text), only among models evaluated the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence, Tuple

OFFLINE_ENV = "FLA_EVAL_OFFLINE"
HAYSTACK_ENV = "FLA_EVAL_HAYSTACK"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def fla_model_types() -> Tuple[str, ...]:
    """The ``model_type`` of every model family ``import fla`` registers."""
    import fla.models
    from transformers import PretrainedConfig
    types = {getattr(fla.models, name).model_type for name in fla.models.__all__
             if isinstance(getattr(fla.models, name), type) and issubclass(getattr(fla.models, name), PretrainedConfig)}
    return tuple(sorted(types))


def _env_flag(name: str) -> Optional[bool]:
    value = os.environ.get(name)
    if value is None:
        return None
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={value!r}: use one of {_TRUE + _FALSE[:-1]}")


def offline_setting(offline_flag: bool = False, haystack: Optional[str] = None) -> Tuple[bool, Optional[str]]:
    """Whether offline RULER is on, and the haystack corpus (None = the shipped one), from the options and the
    environment (see the module docstring for the precedence)."""
    haystack = haystack or os.environ.get(HAYSTACK_ENV) or None
    forced = _env_flag(OFFLINE_ENV)
    if offline_flag or haystack:
        return True, haystack
    if forced is not None:
        return forced, haystack
    # read as huggingface_hub reads them
    hf_offline = any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
                     for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return hf_offline, haystack


def register_models() -> None:
    """``import fla`` (transformers Auto classes) and register ``FLALM`` with lm-eval as ``fla``. Idempotent."""
    import fla  # noqa: F401  (registers the model families with transformers)
    from lm_eval.api.registry import get_model, register_model
    try:
        if get_model("fla") is _flalm_class():
            return
    except (ValueError, KeyError):
        pass
    register_model("fla")(_flalm_class())


_FLALM = None


def _flalm_class():
    """``FLALM``: lm-eval's ``HFLM`` (the ``hf`` backend: batching with left padding, ``use_cache`` generation,
    loglikelihoods) for fla models. Built lazily so that importing this module does not import lm-eval."""
    global _FLALM
    if _FLALM is not None:
        return _FLALM
    from lm_eval.models.huggingface import HFLM

    class FLALM(HFLM):
        """The ``hf`` backend restricted to this library's models: ``pretrained`` is a saved fla model directory
        (or an fla ``PreTrainedModel`` instance); any other model type is refused with the allowed ones named."""

        def __init__(self, pretrained="", **kwargs):
            if isinstance(pretrained, str):
                _check_fla_checkpoint(pretrained)
            else:
                model_type = getattr(getattr(pretrained, "config", None), "model_type", None)
                if model_type not in fla_model_types():
                    raise ValueError(f"model 'fla': pretrained is a {type(pretrained).__name__} with model_type "
                                     f"{model_type!r}; allowed model types: {', '.join(fla_model_types())}")
            # fla's model types are registered with AutoModelForCausalLM at run time, which lm-eval's static
            # causal-LM name list does not see: say "causal" instead of letting it guess (and warn)
            kwargs.setdefault("backend", "causal")
            super().__init__(pretrained=pretrained, **kwargs)

    _FLALM = FLALM
    return FLALM


def _check_fla_checkpoint(path: str) -> None:
    if not path:
        raise ValueError("model 'fla' needs --model_args pretrained=PATH (a directory written by save_pretrained)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"model 'fla': pretrained={path!r} is not a model directory (no config.json); pass a "
                         f"directory written by save_pretrained, e.g. exp/tiny-gdn-swa/hf")
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in fla_model_types():
        raise ValueError(f"model 'fla': {config_file} has model_type={model_type!r}; allowed model types: "
                         f"{', '.join(fla_model_types())} (use --model hf for other transformers models)")


def _split_argv(argv: Sequence[str]):
    parser = argparse.ArgumentParser(prog="python -m evals.harness", add_help=False, allow_abbrev=False)
    parser.add_argument("--offline", action="store_true",
                        help=f"offline RULER NIAH haystack (also: {OFFLINE_ENV}=1, HF_HUB_OFFLINE=1)")
    parser.add_argument("--haystack", default=None, metavar="PATH",
                        help=f"local haystack corpus for offline RULER (implies --offline; also {HAYSTACK_ENV}); "
                             "default: assets/corpus")
    ours, rest = parser.parse_known_args(list(argv))
    return ours, rest, parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run lm-eval's command line on ``argv`` (default ``sys.argv[1:]``) with fla registered and, if asked for,
    the offline RULER haystack."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest, parser = _split_argv(argv)
    if any(a in ("-h", "--help") for a in rest):
        print("evals.harness options (the rest is lm-eval's command line, below):")
        print(parser.format_help().split("\n", 1)[1])
    try:
        offline, haystack = offline_setting(ours.offline, ours.haystack)
        if offline:
            from evals.ruler_offline import enable_offline_haystack
            corpus = enable_offline_haystack(haystack)
            print(f"[evals.harness] offline RULER haystack: {corpus} (regex sentence splitter)", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    register_models()

    from lm_eval.__main__ import cli_evaluate
    saved = sys.argv
    sys.argv = [saved[0] if saved else "lm_eval"] + rest
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
