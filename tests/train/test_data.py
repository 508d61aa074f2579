"""Training data: shipped assets, loading, packing, sharding, varlen cu_seqlens, resumable loader, errors."""

import dataclasses
import json
import os

import pytest
import torch

from fla.train.config import JobConfig
from fla.train.data import (
    ASSETS_DIR,
    DEFAULT_CORPUS,
    DEFAULT_TOKENIZER,
    DataConfigError,
    build_dataloader,
    build_dataset,
    cu_seqlens_from_starts,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

BOS, EOS = 1, 2


class IntTokenizer:
    """Text "a b c" -> ids [a, b, c]: documents are recognisable in the packed stream."""

    bos_token_id, eos_token_id = BOS, EOS

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w) for w in text.split()]}


def make_docs(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 40, (n,), generator=g).tolist()
    # document i holds tokens 1000 * (i + 1) + j, so every token names its document
    return [[1000 * (i + 1) + j for j in range(L)] for i, L in enumerate(lens)]


def doc_of(tok):
    return tok // 1000 - 1 if tok >= 1000 else None


def write_jsonl(path, docs, column="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({column: " ".join(map(str, d)), "id": 0}) + "\n")
    return str(path)


def cfg(**kw):
    base = dict(dataset="json", dataset_split="train", batch_size=2, seq_len=16, context_len=16, num_workers=0,
                prefetch_factor=2, seed=7)
    base.update(kw)
    return dataclasses.replace(JobConfig().training, **base)


@pytest.fixture
def docs_file(tmp_path):
    docs = make_docs()
    return docs, write_jsonl(tmp_path / "docs.jsonl", docs)


def stream(batches):
    return torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist()


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------ assets
def test_assets_tokenizer_offline():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEFAULT_TOKENIZER))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 8192
    text = "To be, or not to be: that is the question.\n  In the beginning God created the heaven. ünïcode ✓ 1234"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # a real BPE, not bytes
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (DEFAULT_TOKENIZER / name).is_file()


def test_assets_corpus_loads_and_is_small():
    import datasets

    ds = datasets.load_dataset(str(DEFAULT_CORPUS))
    assert set(ds) == {"train", "validation"}
    assert "text" in ds["train"].column_names and len(ds["train"]) > 50 and len(ds["validation"]) >= 3
    assert not set(ds["train"]["title"]) & set(ds["validation"]["title"])
    assert sum(len(t) for t in ds["train"]["text"]) > 5_000_000
    size = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file())
    assert size < 3.2e6, size
    assert (ASSETS_DIR / "README.md").is_file()


def test_default_pipeline_on_shipped_assets():
    c = cfg(dataset=str(DEFAULT_CORPUS), batch_size=2, seq_len=64, num_workers=0)
    b = next(iter(build_dataloader(c)))  # default tokenizer: the shipped one
    assert b["input_ids"].shape == (2, 64) and b["input_ids"].dtype == torch.int64
    assert b["input_ids"][0, 0] == BOS and torch.equal(b["labels"], b["input_ids"])


# ----------------------------------------------------------------------------------------------------- packing
def test_packing_full_windows_with_bos_eos(docs_file):
    docs, path = docs_file
    ds = build_dataset(cfg(data_files=path), IntTokenizer())
    order = list(ds.shard_documents(0, 0))
    expected = []
    for text in order:
        expected += [BOS] + [int(w) for w in text.split()] + [EOS]
    n = len(expected) // 32 + 3  # past the epoch end: the next epoch continues the stream
    batches = take(build_dataloader(cfg(data_files=path), IntTokenizer()), n)
    for b in batches:
        assert set(b) == {"input_ids", "labels"}
        assert b["input_ids"].shape == (2, 16) and b["input_ids"].dtype == torch.int64
        assert torch.equal(b["labels"], b["input_ids"])
    got = stream(batches)
    assert got[: len(expected)] == expected
    assert sorted({doc_of(t) for t in expected} - {None}) == list(range(len(docs)))
    # epoch 1 is reshuffled
    assert got[len(expected)] == BOS and list(ds.shard_documents(0, 1)) != order


@pytest.mark.parametrize("dp,workers", [(1, 3), (2, 2), (3, 1)])
def test_sharding_disjoint_and_covering(docs_file, dp, workers):
    docs, path = docs_file
    seen = []
    for rank in range(dp):
        ds = build_dataset(cfg(data_files=path, num_workers=workers), IntTokenizer(), rank, dp)
        for shard in range(max(workers, 1)):
            seen.append({doc_of(int(t.split()[0])) for t in ds.shard_documents(shard, 0)})
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert not seen[i] & seen[j]
    assert set().union(*seen) == set(range(len(docs)))


def test_sharding_through_worker_processes(docs_file):
    docs, path = docs_file
    per_rank = []
    for rank in range(2):
        loader = build_dataloader(cfg(data_files=path, num_workers=2, batch_size=1, seq_len=8), IntTokenizer(), rank, 2)
        ds = loader.dataset
        # stay inside epoch 0 of both shards (epoch 1 is reshuffled, so shards differ from epoch 0's)
        n_tok = min(sum(len(t.split()) + 2 for t in ds.shard_documents(s, 0)) for s in range(2))
        expected = {doc_of(int(t.split()[0])) for s in range(2) for t in ds.shard_documents(s, 0)}
        got = {doc_of(t) for t in stream(take(loader, 2 * (n_tok // 8)))} - {None}
        assert got <= expected and len(got) > len(expected) // 2
        per_rank.append(expected)
    assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == set(range(len(docs)))


# ------------------------------------------------------------------------------------------------------ varlen
def test_cu_seqlens_from_starts():
    assert cu_seqlens_from_starts([], 10, 4).tolist() == [0, 4, 8, 10]
    assert cu_seqlens_from_starts([0, 3, 9], 12, 5).tolist() == [0, 3, 8, 9, 12]
    assert cu_seqlens_from_starts([5], 5 + 1, 100).dtype == torch.int32


@pytest.mark.parametrize("context_len", [5, 16, 64])
def test_varlen_cu_seqlens_at_document_boundaries(docs_file, context_len):
    docs, path = docs_file
    c = cfg(data_files=path, varlen=True, batch_size=1, seq_len=64, context_len=context_len)
    for b in take(build_dataloader(c, IntTokenizer()), 12):
        ids, cu = b["input_ids"][0], b["cu_seqlens"]
        assert ids.shape == (64,) and cu.dtype == torch.int32 and cu.dim() == 1
        assert cu[0] == 0 and cu[-1] == 64 and bool((cu[1:] > cu[:-1]).all())
        assert bool(((cu[1:] - cu[:-1]) <= context_len).all())
        bos = set(torch.nonzero(ids == BOS).flatten().tolist())
        assert bos <= set(cu.tolist())
        # every boundary is a document start or a multiple of context_len past the previous document start
        starts = sorted(bos | {0})
        for x in cu.tolist()[1:-1]:
            s = max(p for p in starts if p <= x)
            assert x == s or (x - s) % context_len == 0
        # pieces never straddle documents
        for a, z in zip(cu.tolist(), cu.tolist()[1:]):
            assert len({doc_of(t) for t in ids[a:z].tolist()} - {None}) <= 1


# ------------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("workers,varlen", [(0, False), (2, False), (2, True), (0, True)])
def test_state_restore_resumes_exact_batches(docs_file, workers, varlen):
    docs, path = docs_file
    c = cfg(data_files=path, num_workers=workers, varlen=varlen, batch_size=1 if varlen else 2, seq_len=24,
            context_len=10)
    for cut in (5, 13):  # 13 crosses an epoch end of some shards
        loader = build_dataloader(c, IntTokenizer())
        it = iter(loader)
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(loader.state_dict()))  # plain data
        reference = [next(it) for _ in range(9)]
        del it
        resumed = build_dataloader(c, IntTokenizer())
        resumed.load_state_dict(state)
        again = take(resumed, 9)
        for a, b in zip(reference, again):
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (cut, k)
        assert resumed.state_dict()["batches"] == cut + 9


def test_state_requires_same_worker_count(docs_file):
    _, path = docs_file
    loader = build_dataloader(cfg(data_files=path, num_workers=2), IntTokenizer())
    take(loader, 3)
    other = build_dataloader(cfg(data_files=path, num_workers=0), IntTokenizer())
    with pytest.raises(DataConfigError, match="num_workers"):
        other.load_state_dict(loader.state_dict())


# ------------------------------------------------------------------------------------------------------ sources
def test_local_sources(tmp_path):
    docs = make_docs(12)
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "train.jsonl", docs)
    f = write_jsonl(tmp_path / "one.jsonl", docs, column="content")
    tok = IntTokenizer()
    first = lambda c: stream(take(build_dataloader(c, tok), 4))  # noqa: E731
    ref = first(cfg(dataset=str(d)))  # a local dataset directory
    assert first(cfg(dataset="json", data_files=str(d / "train.jsonl"))) == ref  # builder + data_files
    assert first(cfg(dataset=f)) == ref  # a single local file, "content" column
    streamed = first(cfg(dataset="json", data_files=str(d / "train.jsonl"), streaming=True))
    assert streamed[0] == BOS and ref[0] == BOS
    # streaming reads in order: the first document comes first
    assert streamed[1:1 + len(docs[0])] == docs[0]


def test_streaming_sharding_and_resume(tmp_path):
    docs = make_docs(15)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    c = cfg(dataset="json", data_files=path, streaming=True, num_workers=2, seq_len=8, batch_size=1)
    ds = build_dataset(c, IntTokenizer(), 1, 2)
    shards = [{doc_of(int(t.split()[0])) for t in ds.shard_documents(s, 0)} for s in range(2)]
    assert not shards[0] & shards[1]
    loader = build_dataloader(c, IntTokenizer())
    it = iter(loader)
    for _ in range(6):
        next(it)
    state = loader.state_dict()
    ref = [next(it)["input_ids"] for _ in range(5)]
    resumed = build_dataloader(c, IntTokenizer())
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(ref, take(resumed, 5)))


def test_interleaved_datasets(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(10, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", [[999] * 5] * 10)
    c = cfg(dataset=f"{a},{b}", data_probs="0.5,0.5", seq_len=32)
    toks = set(stream(take(build_dataloader(c, IntTokenizer()), 6)))
    assert 999 in toks and any(t >= 1000 for t in toks)


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,match", [
    (dict(varlen=True, batch_size=2), "batch_size"),
    (dict(seq_len=0), "seq_len"),
    (dict(num_workers=-1), "num_workers"),
    (dict(dataset="./no/such/dir"), "does not exist"),
    (dict(dataset="a.jsonl,b.jsonl"), "data_probs"),
    (dict(dataset="a.jsonl,b.jsonl", data_probs="0.5,0.6"), "sum to 1"),
    (dict(dataset="x", dataset_split="train,validation"), "dataset_split"),
    (dict(dataset=""), "dataset"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(DataConfigError, match=match):
        build_dataset(cfg(**kw), IntTokenizer())


def test_bad_data_raises(tmp_path, docs_file):
    _, path = docs_file
    with pytest.raises(DataConfigError, match="num_workers"):
        build_dataset(cfg(data_files=path, num_workers=30), IntTokenizer())
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "1 2 3"}) + "\n")
    with pytest.raises(DataConfigError, match="text column"):
        build_dataset(cfg(data_files=str(other)), IntTokenizer())
    weird = tmp_path / "x.weird"
    weird.write_text("1 2 3\n")
    with pytest.raises(DataConfigError, match="unknown data file type"):
        build_dataset(cfg(dataset=str(weird)), IntTokenizer())
    with pytest.raises(DataConfigError, match="rank"):
        build_dataset(cfg(data_files=path), IntTokenizer(), 2, 2)

    class NoSpecials(IntTokenizer):
        bos_token_id = eos_token_id = None

    with pytest.raises(DataConfigError, match="bos"):
        build_dataset(cfg(data_files=path), NoSpecials())
