"""Perplexity over a text dataset, overall and by position in the context (does the loss keep falling with position?).

Documents are tokenised as the trainer does (``[bos] + tokens + [eos]``, ``fla/train/data.py``), concatenated and
cut into consecutive blocks of ``block_size`` tokens (the unfinished tail is dropped). Each block is scored on its
own: the loss at position ``t`` (1 <= t < block_size) is the cross-entropy of token ``t`` given tokens ``0..t-1``.
Positions are grouped into buckets ``[0, b), [b, 2b), ...`` of ``bucket_size`` tokens.

Data (``--data``): a ``.txt`` file (one document), a ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file (optionally
compressed, a ``text`` column), a local dataset folder (e.g. ``assets/corpus``), or a ``datasets`` hub name with
``--dataset_name`` (its config) and ``--split``; loading is the trainer's (``fla.train.data.load_documents``).

    python -m evals.ppl --model exp/a/hf exp/b/hf --data assets/corpus --split validation --block_size 2048 \\
        --bucket_size 128 --output results/ppl        # per model: JSON + CSV; all models: loss_by_position.png
    python -m evals.ppl --plot_from results/ppl/a.json results/ppl/b.json --plot results/ppl/compare.png

As a function: ``evaluate_perplexity(model, blocks)`` on a ``[N, T]`` tensor from ``pack_documents``, or
``perplexity(model, tokenizer, data=..., ...)`` for both steps.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from types import SimpleNamespace
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from evals.common import DTYPES, EvalArgumentError, check_int, load_model, model_device, model_name, model_source

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "corpus")


def load_texts(data: str = DEFAULT_DATA, split: str = "validation", dataset_name: Optional[str] = None,
               data_files: Optional[str] = None, streaming: bool = False) -> Iterable[str]:
    """The documents of ``data`` as strings (see the module docstring). A ``.txt`` file is one document; anything
    else goes through the trainer's loader, whose errors name the setting."""
    if os.path.isfile(data) and data.endswith(".txt"):
        with open(data, encoding="utf-8") as f:
            return [f.read()]
    from fla.train.data import DataConfigError, load_documents
    spec = SimpleNamespace(dataset=data, dataset_name=dataset_name, dataset_split=split, data_files=data_files,
                           streaming=streaming)
    try:
        dataset = load_documents(spec)
    except DataConfigError as e:
        raise EvalArgumentError(f"--data={data!r} (split={split!r}, dataset_name={dataset_name!r}): "
                                    f"{str(e).replace('--training.', '--')}") from e
    return (row["text"] for row in dataset)


def pack_documents(texts: Iterable[str], tokenizer, block_size: int, max_blocks: Optional[int] = None,
                   add_bos: bool = True, add_eos: bool = True) -> torch.Tensor:
    """Tokenise ``texts`` (``[bos] + tokens + [eos]`` each, as in training), concatenate and cut into blocks.

    Returns an int64 tensor [N, block_size] (N <= max_blocks; the tail shorter than a block is dropped). Stops
    reading ``texts`` once ``max_blocks`` blocks are full."""
    check_int("block_size", block_size, 2)
    if max_blocks is not None:
        check_int("max_blocks", max_blocks)
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id if add_eos else None
    need = None if max_blocks is None else max_blocks * block_size
    stream: List[int] = []
    for text in texts:
        ids = tokenizer(text or "", add_special_tokens=False)["input_ids"]
        stream.extend(([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else []))
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise EvalArgumentError(f"block_size={block_size}: the data holds only {len(stream)} tokens, not one "
                                    f"full block; use a smaller block_size or more data")
    return torch.tensor(stream[:n * block_size], dtype=torch.long).view(n, block_size)


@torch.no_grad()
def evaluate_perplexity(model, blocks: torch.Tensor, batch_size: int = 1, bucket_size: Optional[int] = None,
                        progress: bool = True, desc: str = "perplexity") -> Dict:
    """Loss and perplexity of ``model`` on ``blocks`` [N, T] (int64 token ids), overall and per position bucket.

    ``model(input_ids=[B, T], use_cache=False).logits`` -> [B, T, V]; it runs in eval mode (training mode restored).
    ``bucket_size``: positions per bucket (default ``T // 16``, at least 1).

    Returns a dict: ``loss`` (mean nats per predicted token), ``ppl`` (``exp(loss)``), ``tokens`` (predicted
    tokens: ``N * (T - 1)``), ``blocks``, ``block_size``, ``bucket_size``, ``buckets`` (list of ``{"start", "end",
    "tokens", "loss", "ppl"}``: predicted positions ``start <= t < end``) and ``loss_by_position`` (list of T - 1
    floats, positions 1..T-1).
    """
    if blocks.ndim != 2:
        raise EvalArgumentError(f"blocks must be [num_blocks, block_size], got shape {list(blocks.shape)}")
    N, T = blocks.shape
    check_int("block_size", T, 2)
    check_int("batch_size", batch_size)
    bucket_size = max(1, T // 16) if bucket_size is None else check_int("bucket_size", bucket_size)
    device = model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    loss_sum = torch.zeros(T - 1, dtype=torch.float64)
    bar = tqdm(total=N, desc=desc, unit="block", disable=not progress)
    try:
        for s in range(0, N, batch_size):
            x = blocks[s:s + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
            losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                     reduction="none").view(x.shape[0], T - 1)
            loss_sum += losses.double().sum(0).cpu()
            bar.update(x.shape[0])
            done = min(s + batch_size, N)
            bar.set_postfix(ppl=f"{math.exp(loss_sum.sum().item() / (done * (T - 1))):.3f}")
    finally:
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    by_position = loss_sum / N
    loss = by_position.mean().item()
    buckets = []
    for start in range(0, T, bucket_size):
        end = min(start + bucket_size, T)
        lo = max(start, 1)  # position 0 predicts nothing
        if lo >= end:
            continue
        b_loss = by_position[lo - 1:end - 1].mean().item()
        buckets.append({"start": start, "end": end, "tokens": N * (end - lo), "loss": b_loss,
                        "ppl": math.exp(b_loss)})
    return {"loss": loss, "ppl": math.exp(loss), "tokens": N * (T - 1), "blocks": N, "block_size": T,
            "bucket_size": bucket_size, "buckets": buckets, "loss_by_position": by_position.tolist()}


def perplexity(model, tokenizer, data: str = DEFAULT_DATA, split: str = "validation", block_size: int = 2048,
               max_blocks: Optional[int] = None, batch_size: int = 1, bucket_size: Optional[int] = None,
               dataset_name: Optional[str] = None, data_files: Optional[str] = None, progress: bool = True) -> Dict:
    """``load_texts`` -> ``pack_documents`` -> ``evaluate_perplexity`` (arguments as there)."""
    texts = load_texts(data, split, dataset_name, data_files)
    blocks = pack_documents(texts, tokenizer, block_size, max_blocks)
    return evaluate_perplexity(model, blocks, batch_size, bucket_size, progress)


def write_results(result: Dict, path_stem: str) -> List[str]:
    """Write ``<path_stem>.json`` (everything) and ``<path_stem>.csv`` (one row per bucket, then an ``all`` row).
    Returns the two paths."""
    os.makedirs(os.path.dirname(os.path.abspath(path_stem)), exist_ok=True)
    with open(path_stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(path_stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "start", "end", "tokens", "loss", "ppl"])
        for b in result["buckets"]:
            w.writerow([result.get("name", ""), b["start"], b["end"], b["tokens"], f"{b['loss']:.6f}",
                        f"{b['ppl']:.4f}"])
        w.writerow([result.get("name", ""), "all", "", result["tokens"], f"{result['loss']:.6f}",
                    f"{result['ppl']:.4f}"])
    return [path_stem + ".json", path_stem + ".csv"]


def plot_loss_by_position(results: Sequence[Dict], path: str, title: Optional[str] = None) -> str:
    """One PNG with a line per result: bucket-mean loss against position (bucket midpoints). Each result is a dict
    from ``evaluate_perplexity`` with a ``name``. Returns ``path``."""
    if not results:
        raise EvalArgumentError("plot_loss_by_position: no results to plot")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results):
        mids = [(b["start"] + b["end"]) / 2 for b in r["buckets"]]
        ax.plot(mids, [b["loss"] for b in r["buckets"]], marker="o", markersize=3,
                label=f"{r.get('name', f'model {i}')} (ppl {r['ppl']:.2f})")
    ax.set_xlabel("position in context (tokens)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "Loss by position")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(results: Sequence[Dict]) -> str:
    """A markdown table: one row per model, overall ppl and the loss of the first, middle and last bucket."""
    lines = ["| model | tokens | loss | ppl | loss first bucket | loss middle bucket | loss last bucket |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        b = r["buckets"]
        cells = [f"{x['loss']:.3f} ({x['start']}-{x['end']})" for x in (b[0], b[len(b) // 2], b[-1])]
        lines.append(f"| {r.get('name', '')} | {r['tokens']} | {r['loss']:.3f} | {r['ppl']:.2f} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def _evaluate_models(args) -> List[Dict]:
    results, blocks_by_tokenizer = [], {}
    for i, path in enumerate(args.model):
        model, tokenizer = load_model(path, args.dtype, args.device, args.tokenizer)
        name = args.name[i] if args.name else model_name(path)
        tok_path = args.tokenizer or model_source(path)[0]
        if tok_path not in blocks_by_tokenizer:
            texts = load_texts(args.data, args.split, args.dataset_name, args.data_files)
            blocks_by_tokenizer[tok_path] = pack_documents(texts, tokenizer, args.block_size, args.max_blocks)
        result = evaluate_perplexity(model, blocks_by_tokenizer[tok_path], args.batch_size, args.bucket_size,
                                     desc=name)
        result = {"name": name, "model": path, "data": args.data, "split": args.split, **result}
        results.append(result)
        if args.output:
            for p in write_results(result, os.path.join(args.output, name)):
                print(f"wrote {p}", file=sys.stderr)
        del model
    return results


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    """The command line (see the module docstring); returns the result dicts (one per model)."""
    parser = argparse.ArgumentParser(prog="python -m evals.ppl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+",
                        help="save_pretrained directories; random-init:DIR for DIR's configuration untrained")
    parser.add_argument("--name", nargs="+", default=None, help="display names (default: from the paths)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: each model's directory)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="text file, data file, dataset folder or hub name")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--dataset_name", default=None, help="the dataset's config name (datasets' `name`)")
    parser.add_argument("--data_files", default=None, help="comma-separated data files (datasets' `data_files`)")
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--max_blocks", type=int, default=None, help="evaluate at most this many blocks")
    parser.add_argument("--bucket_size", type=int, default=None, help="positions per bucket (default block_size/16)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--output", default=None, help="folder for <name>.json / <name>.csv (and the plot)")
    parser.add_argument("--plot", default=None, help="PNG path (default: <output>/loss_by_position.png)")
    parser.add_argument("--plot_from", nargs="+", default=None, help="plot these result JSON files, evaluate nothing")
    args = parser.parse_args(argv)

    if args.plot_from:
        results = []
        for path in args.plot_from:
            with open(path) as f:
                r = json.load(f)
            r.setdefault("name", os.path.splitext(os.path.basename(path))[0])
            results.append(r)
        print(plot_loss_by_position(results, args.plot or "loss_by_position.png"))
        return results
    if not args.model:
        parser.error("--model is required (or --plot_from to plot saved results)")
    if args.name and len(args.name) != len(args.model):
        parser.error(f"--name: got {len(args.name)} names for {len(args.model)} models")
    try:
        results = _evaluate_models(args)
    except EvalArgumentError as e:
        parser.error(str(e))
    print(format_table(results))
    plot = args.plot or (os.path.join(args.output, "loss_by_position.png") if args.output else None)
    if plot:
        print(f"wrote {plot_loss_by_position(results, plot)}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
