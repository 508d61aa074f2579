"""Synthetic recall: multi-query associative recall (MQAR) and single-needle retrieval, accuracy per context length.

The sequences are drawn on the fly from the tokenizer's vocabulary (its ordinary tokens, special tokens left out),
split at random (fixed by ``seed``) into three disjoint pools: keys, values and filler.

- ``mqar`` at length ``L`` with ``N`` pairs (default ``L // 16``)::

      [bos] k1 v1 k2 v2 ... kN vN  f f f ... f  q1 a1 q2 a2 ... qN aN

  keys distinct within a sequence, values drawn at random, filler tokens up to length ``L``, then every key once
  in random order (``q``), each followed by its value (``a``). Score: the fraction of the ``a`` the model predicts.
- ``needle`` at length ``L``::

      [bos] f f ... f  k v1 .. vm  f ... f  k v1 .. vm

  one key and ``m = value_length`` distinct value tokens hidden at a random depth of a filler haystack; the sequence
  ends by repeating the key, and the model must continue with the value. Score: the fraction of sequences whose
  whole value is predicted.

Scoring is teacher-forced: one forward over the full sequence, the argmax at the position before each answer token.
For a needle this equals greedy generation (every answer token is the argmax given the right prefix exactly when
greedy decoding produces the whole answer); for MQAR each answer is a single token.

As a function (e.g. a quick metric during training)::

    from evals.recall import evaluate_recall
    scores = evaluate_recall(model, tokenizer, lengths=[256, 1024], num_samples=32)
    # {'mqar/256': 0.91, 'mqar/1024': 0.40, 'needle/256': 1.0, 'needle/1024': 0.97}

From the command line::

    python -m evals.recall --model exp/tiny-gdn-swa/hf --lengths 128 256 512 --num_samples 64 --output results/recall.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from evals.common import DTYPES, EvalArgumentError, check_int, load_model, model_device, model_name

TASKS = ("mqar", "needle")


def token_pools(tokenizer, vocab_size: Optional[int] = None, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """(keys, values, filler): three disjoint 1-D int64 tensors of token ids, together every id below
    ``min(len(tokenizer), vocab_size)`` except the tokenizer's special tokens, shuffled with ``seed``."""
    n = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = torch.tensor([i for i in range(n) if i not in special], dtype=torch.long)
    if ids.numel() < 6:
        raise EvalArgumentError(f"tokenizer: only {ids.numel()} ordinary tokens; need at least 6")
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))]
    third = ids.numel() // 3
    return ids[:third], ids[third:2 * third], ids[2 * third:]


def _pick(pool: torch.Tensor, shape, generator: torch.Generator) -> torch.Tensor:
    return pool[torch.randint(pool.numel(), shape, generator=generator)]


def _distinct(pool: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    return pool[torch.randperm(pool.numel(), generator=generator)[:k]]


def make_mqar(pools, length: int, num_samples: int, num_kv_pairs: Optional[int] = None, bos: Optional[int] = None,
              generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MQAR sequences (layout in the module docstring).

    Returns ``input_ids`` [num_samples, length] int64 and ``answer_mask`` [num_samples, length] bool (True at the
    value tokens that follow each query)."""
    keys, values, filler = pools
    prefix = 0 if bos is None else 1
    pairs = num_kv_pairs if num_kv_pairs is not None else max(1, length // 16)
    check_int("num_kv_pairs", pairs)
    if prefix + 4 * pairs > length:
        raise EvalArgumentError(f"num_kv_pairs={pairs}: {pairs} pairs and {pairs} queries need "
                                f"{prefix + 4 * pairs} tokens, more than length={length}")
    if pairs > keys.numel():
        raise EvalArgumentError(f"num_kv_pairs={pairs}: the vocabulary has only {keys.numel()} key tokens")
    g = generator or torch.Generator().manual_seed(0)
    ids = torch.empty(num_samples, length, dtype=torch.long)
    mask = torch.zeros(num_samples, length, dtype=torch.bool)
    gap = length - prefix - 4 * pairs
    for i in range(num_samples):
        k = _distinct(keys, pairs, g)
        v = _pick(values, (pairs,), g)
        order = torch.randperm(pairs, generator=g)
        kv = torch.stack([k, v], 1).flatten()
        queries = torch.stack([k[order], v[order]], 1).flatten()
        row = [kv, _pick(filler, (gap,), g), queries]
        if bos is not None:
            row.insert(0, torch.tensor([bos]))
        ids[i] = torch.cat(row)
        mask[i, length - 2 * pairs + 1::2] = True
    return ids, mask


def make_needle(pools, length: int, num_samples: int, value_length: int = 1, bos: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Single-needle sequences (layout in the module docstring); the needle starts at a uniformly random depth.

    Returns ``input_ids`` [num_samples, length] int64 and ``answer_mask`` [num_samples, length] bool (True at the
    final ``value_length`` tokens)."""
    keys, values, filler = pools
    check_int("value_length", value_length)
    if value_length > values.numel():
        raise EvalArgumentError(f"value_length={value_length}: the vocabulary has only {values.numel()} value tokens")
    prefix = 0 if bos is None else 1
    needle_len = 1 + value_length
    haystack = length - prefix - 2 * needle_len
    if haystack < 0:
        raise EvalArgumentError(f"length={length}: too short for a needle of {needle_len} tokens asked twice "
                                f"(need >= {prefix + 2 * needle_len})")
    g = generator or torch.Generator().manual_seed(0)
    ids = torch.empty(num_samples, length, dtype=torch.long)
    mask = torch.zeros(num_samples, length, dtype=torch.bool)
    for i in range(num_samples):
        needle = torch.cat([_distinct(keys, 1, g), _distinct(values, value_length, g)])
        hay = _pick(filler, (haystack,), g)
        depth = int(torch.randint(haystack + 1, (1,), generator=g))
        row = [hay[:depth], needle, hay[depth:], needle]
        if bos is not None:
            row.insert(0, torch.tensor([bos]))
        ids[i] = torch.cat(row)
        mask[i, length - value_length:] = True
    return ids, mask


@torch.no_grad()
def score_answers(model, input_ids: torch.Tensor, answer_mask: torch.Tensor, batch_size: int = 8,
                  progress: bool = False, desc: str = "recall") -> torch.Tensor:
    """Teacher-forced correctness: a bool tensor [N, L], True where ``answer_mask`` is set and the argmax of the
    logits one position earlier is that token (False elsewhere)."""
    check_int("batch_size", batch_size)
    device = model_device(model)
    correct = torch.zeros_like(answer_mask)
    starts = range(0, input_ids.shape[0], batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        x = input_ids[s:s + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits
        pred = logits[:, :-1].argmax(-1).cpu()
        hit = torch.zeros_like(answer_mask[s:s + batch_size])
        hit[:, 1:] = pred == input_ids[s:s + batch_size, 1:]
        correct[s:s + batch_size] = hit & answer_mask[s:s + batch_size]
    return correct


def evaluate_recall(model, tokenizer, lengths: Sequence[int] = (256, 512, 1024), num_samples: int = 32,
                    tasks: Sequence[str] = TASKS, num_kv_pairs: Optional[int] = None, value_length: int = 1,
                    batch_size: int = 8, seed: int = 0, add_bos: bool = True, progress: bool = False
                    ) -> Dict[str, float]:
    """Recall accuracy of ``model`` per task and context length.

    ``model``: a causal LM called as ``model(input_ids=[B, T], use_cache=False).logits`` -> [B, T, V]; it is put in
    eval mode for the call and its training mode restored afterwards. ``tokenizer``: supplies the vocabulary (ids
    below ``min(len(tokenizer), model.config.vocab_size)``) and ``bos_token_id`` (prepended when ``add_bos``).
    ``lengths``: sequence lengths in tokens. ``num_kv_pairs``: MQAR pairs (default ``length // 16``).
    ``value_length``: needle value tokens. The same ``seed`` gives the same sequences.

    Returns ``{"mqar/<length>": accuracy, "needle/<length>": accuracy, ...}`` (floats in [0, 1]; MQAR: fraction of
    queries answered, needle: fraction of sequences whose whole value is right).
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise EvalArgumentError(f"tasks={tasks!r}: choose from {TASKS}")
    if isinstance(lengths, int) or not lengths:
        raise EvalArgumentError(f"lengths={lengths!r}: must be a non-empty list of integers >= 8")
    for length in lengths:
        check_int("lengths", length, 8)
    check_int("num_samples", num_samples)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    pools = token_pools(tokenizer, vocab, seed)
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    results = {}
    try:
        for task in tasks:
            for length in lengths:
                g = torch.Generator().manual_seed(seed * 1_000_003 + length * 2 + TASKS.index(task))
                if task == "mqar":
                    ids, mask = make_mqar(pools, length, num_samples, num_kv_pairs, bos, g)
                else:
                    ids, mask = make_needle(pools, length, num_samples, value_length, bos, g)
                correct = score_answers(model, ids, mask, batch_size, progress, desc=f"{task}@{length}")
                if task == "mqar":
                    acc = correct.sum().item() / mask.sum().item()
                else:
                    acc = (correct.sum(1) == mask.sum(1)).float().mean().item()
                results[f"{task}/{length}"] = acc
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return results


def format_table(results: Dict[str, Dict[str, float]]) -> str:
    """A markdown table: one row per model, one column per ``task/length`` key."""
    columns = sorted({k for r in results.values() for k in r},
                     key=lambda k: (TASKS.index(k.split("/")[0]), int(k.split("/")[1])))
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.1f}" if c in r else "" for c in columns) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    """The command line (see the module docstring); returns ``{model name: evaluate_recall(...)}``."""
    parser = argparse.ArgumentParser(prog="python -m evals.recall", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", required=True,
                        help="save_pretrained directories; random-init:DIR for DIR's configuration untrained")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: each model's directory)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--num_kv_pairs", type=int, default=None, help="MQAR pairs (default: length // 16)")
    parser.add_argument("--value_length", type=int, default=1, help="needle value tokens")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no_bos", action="store_true", help="do not prepend the tokenizer's bos token")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    results = {}
    try:
        for path in args.model:
            model, tokenizer = load_model(path, args.dtype, args.device, args.tokenizer)
            results[model_name(path)] = evaluate_recall(
                model, tokenizer, args.lengths, args.num_samples, args.tasks, args.num_kv_pairs, args.value_length,
                args.batch_size, args.seed, add_bos=not args.no_bos, progress=True)
    except EvalArgumentError as e:
        parser.error(str(e))
    print(format_table(results))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
        print(f"wrote {args.output}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
