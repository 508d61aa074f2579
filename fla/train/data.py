"""Training data: load any ``datasets`` source, shard it, tokenise on the fly and pack it into fixed windows.

Entry points
------------
``build_dataset(training, tokenizer, dp_rank=0, dp_world_size=1)`` -> :class:`PackedDataset`
    An ``IterableDataset`` yielding whole micro-batches (dicts of tensors, see below).
``build_dataloader(training, tokenizer, dp_rank=0, dp_world_size=1)`` -> :class:`StatefulDataLoader`
    A ``torch.utils.data.DataLoader`` over that dataset with ``state_dict()`` / ``load_state_dict()``: a loader
    restored from a saved state yields exactly the batches the original would have yielded next.
``ASSETS_DIR``, ``DEFAULT_CORPUS``, ``DEFAULT_TOKENIZER``
    The shipped offline corpus (``assets/corpus``: ``train`` and ``validation`` splits, a ``text`` column) and
    byte-level BPE tokenizer (``assets/tokenizer``; ``<unk>``=0, ``<s>``=1, ``</s>``=2). Rebuilt by
    ``scripts/build_assets.py``.

``training`` is the parsed ``JobConfig.training`` section (:mod:`fla.train.config`) or any object with the same
fields: ``dataset``, ``dataset_name``, ``dataset_split``, ``data_dir``, ``data_files``, ``data_probs``,
``streaming``, ``batch_size``, ``seq_len``, ``context_len``, ``varlen``, ``num_workers``, ``prefetch_factor``,
``pin_memory``, ``seed`` (``persistent_workers`` is ignored: every ``iter(loader)`` restarts the workers from
the loader's saved position).

Loading (as flame): ``datasets.load_dataset(dataset, name=dataset_name, split=dataset_split or "train",
data_dir=data_dir, data_files=data_files, streaming=streaming)``. ``dataset`` may be a hub name, a local dataset
directory, a builder name (``json``, ``text``, ``parquet``, ``csv``, ``arrow``) with ``data_files``, or a single
local data file (its builder is inferred from the extension). Comma-separated ``dataset`` lists are interleaved
with ``data_probs`` (the other per-dataset fields then take one value or one value per dataset). The text column
is ``text`` (``content`` is accepted as a fallback).

Sharding: the documents are split into ``G = dp_world_size * max(num_workers, 1)`` disjoint shards; data-parallel
rank ``r`` with loader worker ``w`` reads shard ``r * W + w`` (every ``G``-th document of the epoch's order). A
prepared (non-streaming) dataset is reshuffled each epoch with ``seed + epoch``; a streamed one is read in order
(every worker iterates the stream and keeps its own ``G``-th of it). Epochs repeat forever.

Tokenising and packing (as flame): each document becomes ``[bos] + tokens + [eos]`` (a missing bos or eos is
left out), the token streams of a shard's documents are concatenated, and the stream is cut into consecutive
windows of ``seq_len`` tokens; no token is dropped or padded except the unfinished tail at the end of training.

Batches are dicts:

- ``input_ids``: ``[B, T]`` int64, ``B = batch_size``, ``T = seq_len``;
- ``labels``: ``[B, T]`` int64, equal to ``input_ids`` (the model shifts them);
- with ``varlen=True`` (requires ``batch_size == 1``): also ``cu_seqlens``: ``[N + 1]`` int32 offsets into the
  row, a boundary at every document start (bos) inside the window, at 0 and at ``T``, and extra boundaries so no
  piece is longer than ``context_len``: a document piece is split every ``context_len`` tokens counted from its own
  start in the window.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
DEFAULT_CORPUS = ASSETS_DIR / "corpus"
DEFAULT_TOKENIZER = ASSETS_DIR / "tokenizer"

_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv",
             ".arrow": "arrow"}
_COMPRESSION = (".gz", ".xz", ".bz2", ".zst", ".lz4")
_TEXT_COLUMNS = ("text", "content")


class DataConfigError(ValueError):
    """A bad data setting; the message names the flag, the value and what is allowed."""


def _err(flag: str, value: Any, why: str) -> DataConfigError:
    return DataConfigError(f"--training.{flag}={value!r}: {why}")


# ----------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class _Spec:
    """The fields the data pipeline reads, validated."""

    dataset: tuple[str, ...]
    dataset_name: tuple[Optional[str], ...]
    dataset_split: tuple[str, ...]
    data_dir: tuple[Optional[str], ...]
    data_files: Optional[tuple[str, ...]]
    data_probs: Optional[tuple[float, ...]]
    streaming: bool
    batch_size: int
    seq_len: int
    context_len: int
    varlen: bool
    num_workers: int
    prefetch_factor: int
    pin_memory: bool
    persistent_workers: bool
    seed: int


def _split_list(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    if not isinstance(value, str):
        value = ",".join(map(str, value))
    items = [v.strip() for v in value.split(",")]
    return [v if v else None for v in items]


def _per_dataset(flag: str, value: Optional[str], n: int, default=None) -> tuple:
    items = _split_list(value)
    if items is None:
        return (default,) * n
    if len(items) == 1:
        return (items[0] if items[0] is not None else default,) * n
    if len(items) != n:
        raise _err(flag, value, f"needs one value or one per dataset ({n})")
    return tuple(v if v is not None else default for v in items)


def _spec(training: Any) -> _Spec:
    g = lambda name, default=None: getattr(training, name, default)  # noqa: E731
    names = _split_list(g("dataset"))
    if not names or any(n is None for n in names):
        raise _err("dataset", g("dataset"), "must name a dataset (hub name, local directory, builder or file)")
    n = len(names)
    for flag in ("batch_size", "seq_len", "context_len", "prefetch_factor"):
        v = g(flag, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _err(flag, v, "must be an integer >= 1")
    workers = g("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise _err("num_workers", workers, "must be an integer >= 0")
    seed = g("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _err("seed", seed, "must be an integer >= 0")
    varlen = bool(g("varlen", False))
    if varlen and g("batch_size") != 1:
        raise _err("batch_size", g("batch_size"), "must be 1 with --training.varlen (documents are packed in one row)")
    probs = None
    if n > 1:
        raw = _split_list(g("data_probs"))
        if raw is None or len(raw) != n:
            raise _err("data_probs", g("data_probs"),
                       f"interleaving {n} datasets needs {n} comma-separated probabilities")
        try:
            probs = tuple(float(p) for p in raw)
        except (TypeError, ValueError):
            raise _err("data_probs", g("data_probs"), "must be numbers") from None
        if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise _err("data_probs", g("data_probs"), "must be >= 0 and sum to 1")
    files = _split_list(g("data_files"))
    if files is not None and any(f is None for f in files):
        raise _err("data_files", g("data_files"), "has an empty entry")
    return _Spec(
        dataset=tuple(names), dataset_name=_per_dataset("dataset_name", g("dataset_name"), n),
        dataset_split=_per_dataset("dataset_split", g("dataset_split"), n, "train"),
        data_dir=_per_dataset("data_dir", g("data_dir"), n), data_files=tuple(files) if files else None,
        data_probs=probs, streaming=bool(g("streaming", False)), batch_size=g("batch_size"), seq_len=g("seq_len"),
        context_len=g("context_len", g("seq_len")), varlen=varlen, num_workers=workers,
        prefetch_factor=g("prefetch_factor", 2), pin_memory=bool(g("pin_memory", False)),
        persistent_workers=bool(g("persistent_workers", False)), seed=seed,
    )


# ----------------------------------------------------------------------------------------------------- loading
def _builder_for(path: str) -> Optional[str]:
    p = path.lower()
    for c in _COMPRESSION:
        if p.endswith(c):
            p = p[: -len(c)]
    return _BUILDERS.get(os.path.splitext(p)[1])


def _load_one(spec: _Spec, i: int):
    import datasets

    path, files = spec.dataset[i], spec.data_files
    if os.path.isfile(path):  # a single local data file: infer its builder
        builder = _builder_for(path)
        if builder is None:
            raise _err("dataset", path, f"unknown data file type; use one of {sorted(_BUILDERS)} (optionally "
                                        f"compressed: {', '.join(_COMPRESSION)})")
        path, files = builder, [path] + list(files or ())
    elif os.path.sep in path and not os.path.exists(path) and not path.startswith(("hf://", "s3://", "gs://")):
        if path.startswith((".", "/")):
            raise _err("dataset", path, "local path does not exist")
    kwargs = dict(name=spec.dataset_name[i], split=spec.dataset_split[i], data_dir=spec.data_dir[i],
                  streaming=spec.streaming)
    if files:
        kwargs["data_files"] = list(files)
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - hub/network/format errors all become one clear message
        raise DataConfigError(f"--training.dataset={spec.dataset[i]!r} could not be loaded ({kwargs}): {e}") from e
    column = next((c for c in _TEXT_COLUMNS if c in (ds.column_names or ())), None)
    if ds.column_names is not None and column is None:
        raise _err("dataset", spec.dataset[i], f"has no text column {_TEXT_COLUMNS}; columns: {ds.column_names}")
    column = column or "text"
    if column != "text":
        ds = ds.rename_column(column, "text")
    keep = ["text"]
    if ds.column_names is not None:
        ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    return ds


def load_documents(training: Any):
    """The configured ``datasets`` Dataset (or IterableDataset when streaming) with a single ``text`` column."""
    spec = training if isinstance(training, _Spec) else _spec(training)
    parts = [_load_one(spec, i) for i in range(len(spec.dataset))]
    if len(parts) == 1:
        return parts[0]
    import datasets

    return datasets.interleave_datasets(parts, probabilities=list(spec.data_probs), seed=spec.seed,
                                        stopping_strategy="all_exhausted")


def load_tokenizer(tokenizer: Any = None):
    """A ``transformers`` tokenizer: an instance is returned as is, a path/name is loaded (default: the shipped one)."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer or DEFAULT_TOKENIZER), trust_remote_code=True,
                                             model_max_length=int(1e10))
    return tokenizer


# ----------------------------------------------------------------------------------------------------- packing
class PackedDataset(IterableDataset):
    """Shards, tokenises and packs documents into micro-batches (see the module docstring for the layout).

    Iteration state of one shard: ``(epoch, doc, offset)``: the next token is token ``offset`` of the ``doc``-th
    document (counted within the shard, bos/eos included) of epoch ``epoch``. ``state`` is set by
    :class:`StatefulDataLoader` before iterating; each yielded batch carries ``_state`` = ``(shard, state after
    this batch)``, which the loader strips.
    """

    def __init__(self, training: Any, tokenizer: Any = None, dp_rank: int = 0, dp_world_size: int = 1,
                 documents=None):
        self.spec = training if isinstance(training, _Spec) else _spec(training)
        if not (isinstance(dp_world_size, int) and dp_world_size >= 1 and 0 <= dp_rank < dp_world_size):
            raise DataConfigError(f"data-parallel rank {dp_rank!r} of world size {dp_world_size!r} is invalid")
        self.tokenizer = load_tokenizer(tokenizer)
        self.bos = self.tokenizer.bos_token_id
        self.eos = self.tokenizer.eos_token_id
        if self.bos is None and self.eos is None:
            raise DataConfigError("the tokenizer has neither a bos nor an eos token: documents cannot be separated")
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.num_shards_per_rank = max(self.spec.num_workers, 1)
        self.documents = documents if documents is not None else load_documents(self.spec)
        self.streaming = not hasattr(self.documents, "__len__")
        if not self.streaming and len(self.documents) < dp_world_size * self.num_shards_per_rank:
            raise DataConfigError(
                f"the dataset has {len(self.documents)} documents, fewer than the {dp_world_size} ranks x "
                f"{self.num_shards_per_rank} workers that each need their own; lower --training.num_workers")
        # Set by the loader: logical shard of physical worker p is (p + rotation) % W; start states per shard.
        self.rotation = 0
        self.states: dict[int, tuple[int, int, int]] = {}

    # -- shards
    def global_shard(self, shard: int) -> tuple[int, int]:
        """(index, count) of this rank's ``shard``-th worker shard among all ranks' shards."""
        return self.dp_rank * self.num_shards_per_rank + shard, self.dp_world_size * self.num_shards_per_rank

    def shard_documents(self, shard: int, epoch: int, start: int = 0) -> Iterator[str]:
        """Texts of ``shard``'s documents in ``epoch``, from the ``start``-th one."""
        g, G = self.global_shard(shard)
        if not self.streaming:
            n = len(self.documents)
            dtype = torch.int32 if n < 2**31 else torch.int64  # halves the transient memory on big datasets
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.spec.seed + epoch), dtype=dtype)
            order = order[g::G][start:].clone()
            for i in order.tolist():
                yield self.documents[i]["text"]
        else:
            if hasattr(self.documents, "set_epoch"):
                self.documents.set_epoch(epoch)
            # ``.iter`` (unlike ``__iter__``) does not re-split the stream among PyTorch workers by itself.
            i = k = 0
            for batch in self.documents.iter(batch_size=256):
                for text in batch["text"]:
                    if i % G == g:
                        if k >= start:
                            yield text
                        k += 1
                    i += 1

    def tokens(self, text: str) -> list[int]:
        return self._wrap(self.tokenizer(text or "", add_special_tokens=False)["input_ids"])

    def _wrap(self, ids) -> list[int]:
        return ([self.bos] if self.bos is not None else []) + list(ids) + ([self.eos] if self.eos is not None else [])

    def tokenized(self, texts: Iterator[str], group: int = 16) -> Iterator[list[int]]:
        """``[bos] + tokens + [eos]`` of each text; texts are tokenised ``group`` at a time (fast tokenizers run a
        group in parallel)."""
        chunk: list[str] = []
        for text in texts:
            chunk.append(text or "")
            if len(chunk) == group:
                yield from self._tokenize_group(chunk)
                chunk = []
        if chunk:
            yield from self._tokenize_group(chunk)

    def _tokenize_group(self, texts: list[str]) -> Iterator[list[int]]:
        if len(texts) == 1 or not getattr(self.tokenizer, "is_fast", False):
            for t in texts:
                yield self.tokens(t)
        else:
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                yield self._wrap(ids)

    # -- iteration
    def iter_shard(self, shard: int, state: Optional[tuple[int, int, int]] = None) -> Iterator[dict]:
        need = self.spec.batch_size * self.spec.seq_len
        epoch, doc, offset = state or (0, 0, 0)
        buf: list[int] = []
        starts: list[int] = []  # positions in buf where a document begins
        while True:
            got_any = False
            for toks in self.tokenized(self.shard_documents(shard, epoch, doc)):
                got_any = True
                pos = offset
                offset = 0
                while pos < len(toks):
                    if pos == 0:
                        starts.append(len(buf))
                    take = min(len(toks) - pos, need - len(buf))
                    buf.extend(toks[pos:pos + take])
                    pos += take
                    if len(buf) == need:
                        nxt = (epoch, doc, pos) if pos < len(toks) else (epoch, doc + 1, 0)
                        yield self._batch(buf, starts, shard, nxt)
                        buf, starts = [], []
                doc += 1
            if not got_any and doc == 0:
                raise DataConfigError(f"data shard {self.global_shard(shard)} has no documents")
            epoch, doc, offset = epoch + 1, 0, 0

    def _batch(self, buf: list[int], starts: list[int], shard: int, state: tuple[int, int, int]) -> dict:
        B, T = self.spec.batch_size, self.spec.seq_len
        ids = torch.tensor(buf, dtype=torch.long).view(B, T)
        out = {"input_ids": ids, "labels": ids.clone()}
        if self.spec.varlen:
            out["cu_seqlens"] = cu_seqlens_from_starts(starts, T, self.spec.context_len)
        out["_state"] = (shard, state)
        return out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        shard = (physical + self.rotation) % self.num_shards_per_rank
        if info is None and self.num_shards_per_rank > 1:
            # Single-process iteration of a multi-worker layout: round-robin over the shards, like the workers.
            iters = [self.iter_shard(s, self.states.get(s)) for s in range(self.num_shards_per_rank)]
            k = self.rotation
            while True:
                yield next(iters[k % self.num_shards_per_rank])
                k += 1
        else:
            yield from self.iter_shard(shard, self.states.get(shard))


def cu_seqlens_from_starts(starts: Sequence[int], total: int, context_len: int) -> torch.Tensor:
    """``[N + 1]`` int32 offsets: a boundary at 0, at each document start, at ``total`` and every ``context_len``
    tokens inside a longer piece (counted from the piece's start)."""
    bounds = sorted(set([0, *starts]))
    out: list[int] = []
    for a, b in zip(bounds, bounds[1:] + [total]):
        out.extend(range(a, b, context_len))
    out.append(total)
    return torch.tensor(out, dtype=torch.int32)


# ------------------------------------------------------------------------------------------------------ loader
class StatefulDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`PackedDataset` whose position can be saved and restored.

    Worker ``k % W`` produces the ``k``-th batch (PyTorch's round-robin); the loader remembers, per shard, the
    iteration state after the last batch handed out, and which shard is next. ``load_state_dict`` makes the next
    ``iter(loader)`` start every shard there and rotates the worker-to-shard map so the next shard's worker goes
    first: the batch sequence continues exactly. The state is a small dict of ints (DCP/pickle friendly).
    """

    def __init__(self, dataset: PackedDataset, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._shards = dataset.num_shards_per_rank
        self._states: dict[int, tuple[int, int, int]] = {}
        self._next = 0
        self._batches = 0

    def __iter__(self):
        self.dataset.rotation = self._next
        self.dataset.states = dict(self._states)
        for batch in super().__iter__():
            shard, state = batch.pop("_state")
            self._states[int(shard)] = tuple(int(x) for x in state)
            self._next = (int(shard) + 1) % self._shards
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"num_shards": self._shards, "next_shard": self._next, "batches": self._batches,
                "shard_states": {str(k): list(v) for k, v in self._states.items()}}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_shards"]) != self._shards:
            raise DataConfigError(f"the data loader state was saved with {state['num_shards']} workers per rank; "
                                  f"resume with --training.num_workers giving {self._shards} shards")
        self._next = int(state["next_shard"])
        self._batches = int(state["batches"])
        self._states = {int(k): tuple(int(x) for x in v) for k, v in state["shard_states"].items()}


def build_dataset(training: Any, tokenizer: Any = None, dp_rank: int = 0, dp_world_size: int = 1,
                  documents=None) -> PackedDataset:
    """The packed, sharded, tokenised dataset of ``training`` (a ``JobConfig.training``) for one DP rank.

    ``tokenizer``: a ``transformers`` tokenizer or a path/name (default: the shipped ``assets/tokenizer``).
    ``documents``: an already loaded ``datasets`` Dataset/IterableDataset with a ``text`` column (skips loading).
    """
    return PackedDataset(training, tokenizer, dp_rank, dp_world_size, documents)


def build_dataloader(training: Any, tokenizer: Any = None, dp_rank: int = 0, dp_world_size: int = 1,
                     documents=None) -> StatefulDataLoader:
    """A :class:`StatefulDataLoader` yielding the batches of :func:`build_dataset` (see the module docstring)."""
    ds = build_dataset(training, tokenizer, dp_rank, dp_world_size, documents)
    spec = ds.spec
    kwargs: dict[str, Any] = dict(num_workers=spec.num_workers, pin_memory=spec.pin_memory)
    if spec.num_workers > 0:
        # persistent_workers is not forwarded: each ``iter(loader)`` restarts the workers from the loader's state.
        kwargs.update(prefetch_factor=spec.prefetch_factor)
    return StatefulDataLoader(ds, **kwargs)
