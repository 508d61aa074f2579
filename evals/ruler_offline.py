"""Offline haystack for lm-eval's RULER needle-in-a-haystack tasks.

lm-eval 0.4.13 builds the essay-haystack NIAH tasks (``niah_single_2/3``, ``niah_multikey_1``, ``niah_multivalue``,
``niah_multiquery``) from two things it fetches over the network:

- ``lm_eval.tasks.ruler.prepare_niah.get_haystack("essay")`` loads the Paul Graham essays with
  ``datasets.load_dataset("baber/paul_graham_essays")`` (HuggingFace hub);
- ``prepare_niah.cached_sent_tokenize`` splits the haystack into sentences with nltk's ``sent_tokenize``, which needs
  the ``punkt_tab`` model; ``prepare_niah`` calls ``nltk.download("punkt_tab")`` when it is imported.

``enable_offline_haystack(corpus)`` patches exactly those two functions (and, if ``prepare_niah`` is not imported yet,
skips its import-time download):

- ``get_haystack("essay")`` returns the words of a local corpus (the shipped ``assets/corpus`` by default); the
  other haystack types (``repeat``, ``needle``) are built offline by lm-eval already and are left untouched;
- ``cached_sent_tokenize`` becomes ``split_sentences``, a regex splitter.

The task functions live in ``niah_utils.py``, which binds ``get_haystack`` by name (``from prepare_niah import
get_haystack``); lm-eval's YAML loader keeps it as ``sys.modules["lm_eval.tasks.ruler.niah_utils"]`` and reuses it
while the file is unchanged. So the patch replaces ``get_haystack`` in both modules (a later fresh load of
``niah_utils`` binds the patched one from ``prepare_niah``). The essay haystack's words are whitespace-normalised
exactly as lm-eval normalises the essays.
"""

from __future__ import annotations

import functools
import glob
import json
import lzma
import os
import re
from typing import List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.join(REPO_ROOT, "assets", "corpus")
CORPUS_SUFFIXES = (".txt", ".jsonl", ".jsonl.xz", ".json")

# A sentence ends at . ! or ? (possibly repeated), optionally followed by closing quotes / brackets, then whitespace,
# and the next one starts with an upper-case letter or a digit (possibly after an opening quote / bracket).
_SENTENCE_BREAK = re.compile(r"""([.!?]+["'\u201d\u2019)\]]*)\s+(?=["'\u201c\u2018(\[]?[A-Z0-9])""")
# Abbreviations after which a full stop does not end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e no fig al gen col lt capt sgt rev hon u.s mt ave".split()
)


def split_sentences(text: str) -> List[str]:
    """Split ``text`` into sentences with a regex (no model, no download).

    Breaks after ``.``, ``!`` or ``?`` (plus closing quotes / brackets) followed by whitespace and an upper-case
    letter or digit; not after common abbreviations (``Mr.``, ``e.g.``, ...) or single initials (``J.``).
    The whitespace at each break is dropped, so ``" ".join(split_sentences(t)) == t`` for whitespace-normalised
    ``t`` (single spaces). Returns a list of non-empty strings (empty list for blank text).
    """
    sentences, start = [], 0
    for match in _SENTENCE_BREAK.finditer(text):
        end = match.end(1)
        last_word = text[start:end].rsplit(None, 1)[-1].rstrip("\"'\u201d\u2019)]").rstrip(".!?")
        if match.group(1).startswith(".") and (last_word.lower() in _ABBREVIATIONS
                                                or (len(last_word) == 1 and last_word.isalpha())):
            continue
        sentences.append(text[start:end])
        start = match.end()
    if text[start:].strip():
        sentences.append(text[start:])
    return [s for s in sentences if s.strip()]


def _corpus_files(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(f) and f.endswith(CORPUS_SUFFIXES))
        # the training split first: the biggest haystack (the validation split is held out for perplexity)
        files.sort(key=lambda f: (0 if "train" in os.path.basename(f) else 1, f))
        if files:
            return files
        raise FileNotFoundError(f"haystack corpus {path!r} holds no file ending in {CORPUS_SUFFIXES}")
    raise FileNotFoundError(f"haystack corpus {path!r} does not exist (pass a text / .jsonl[.xz] file or a folder "
                            f"of them; default: {DEFAULT_CORPUS})")


def read_corpus(path: str = DEFAULT_CORPUS, text_field: str = "text") -> str:
    """The text of a local corpus: a ``.txt`` file, a ``.json``/``.jsonl``/``.jsonl.xz`` file of records with a
    ``text_field`` (one JSON object per line, or a JSON list), or a folder of such files (read in sorted order, files
    with ``train`` in their name first). Documents are joined with a blank line."""
    docs = []
    for file in _corpus_files(path):
        opener = lzma.open if file.endswith(".xz") else open
        with opener(file, "rt", encoding="utf-8") as f:
            if file.endswith(".txt"):
                docs.append(f.read())
                continue
            if file.endswith(".json"):
                records = json.load(f)
                records = records if isinstance(records, list) else [records]
            else:
                records = (json.loads(line) for line in f if line.strip())
            for i, record in enumerate(records):
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{file}: record {i} has no {text_field!r} field")
                docs.append(record[text_field])
    text = "\n\n".join(docs)
    if not text.strip():
        raise ValueError(f"haystack corpus {path!r} is empty")
    return text


@functools.lru_cache(maxsize=4)
def corpus_words(path: str = DEFAULT_CORPUS) -> List[str]:
    """The corpus as a list of words, whitespace-normalised as lm-eval normalises its essays."""
    return re.sub(r"\s+", " ", read_corpus(path)).strip().split(" ")


_STATE = {"corpus": None, "original_get_haystack": None, "original_sent_tokenize": None}


def _import_prepare_niah():
    """Import ``lm_eval.tasks.ruler.prepare_niah`` without its import-time punkt download: while it is imported,
    ``nltk.data.find("tokenizers/punkt_tab")`` reports the model as present (offline the download can only fail, and
    the regex splitter replaces punkt)."""
    import sys
    name = "lm_eval.tasks.ruler.prepare_niah"
    if name in sys.modules:
        return sys.modules[name]
    import nltk.data
    find = nltk.data.find

    def find_or_pretend(resource_name, *args, **kwargs):
        if resource_name == "tokenizers/punkt_tab":
            return resource_name
        return find(resource_name, *args, **kwargs)

    nltk.data.find = find_or_pretend
    try:
        import lm_eval.tasks.ruler.prepare_niah as prepare_niah
    finally:
        nltk.data.find = find
    return prepare_niah


def enable_offline_haystack(corpus: Optional[str] = None) -> str:
    """Make lm-eval's RULER NIAH tasks build their essay haystack from ``corpus`` (default: the shipped
    ``assets/corpus``) and split sentences with ``split_sentences``. Idempotent; calling it again with another
    corpus switches to that corpus. Returns the corpus path in use. Call it before lm-eval builds the tasks."""
    corpus = os.path.abspath(corpus or DEFAULT_CORPUS)
    _corpus_files(corpus)  # fail now, with the path, rather than deep inside task building
    prepare_niah = _import_prepare_niah()
    if _STATE["original_get_haystack"] is None:
        _STATE["original_get_haystack"] = prepare_niah.get_haystack
        _STATE["original_sent_tokenize"] = prepare_niah.cached_sent_tokenize
    original = _STATE["original_get_haystack"]

    @functools.cache
    def get_haystack(type_haystack):
        if type_haystack == "essay":
            return corpus_words(_STATE["corpus"])
        return original(type_haystack)

    _STATE["corpus"] = corpus
    prepare_niah.get_haystack = get_haystack
    prepare_niah.cached_sent_tokenize = functools.lru_cache(maxsize=1024)(split_sentences)
    import lm_eval.tasks.ruler.niah_utils as niah_utils
    niah_utils.get_haystack = get_haystack
    return corpus


def disable_offline_haystack() -> None:
    """Undo ``enable_offline_haystack`` (lm-eval's own essay download and nltk splitter again)."""
    if _STATE["original_get_haystack"] is None:
        return
    import lm_eval.tasks.ruler.niah_utils as niah_utils
    import lm_eval.tasks.ruler.prepare_niah as prepare_niah
    prepare_niah.get_haystack = niah_utils.get_haystack = _STATE["original_get_haystack"]
    prepare_niah.cached_sent_tokenize = _STATE["original_sent_tokenize"]
    _STATE.update(corpus=None, original_get_haystack=None, original_sent_tokenize=None)
