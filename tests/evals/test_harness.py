"""evals.harness: lm-eval with fla models (``fla`` and ``hf`` backends), RULER NIAH online-free, batched == unbatched."""

import glob
import json
import os

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("wonderwords")

import fla  # noqa: E402,F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evals import harness  # noqa: E402
from evals.ruler_offline import (  # noqa: E402
    DEFAULT_CORPUS, corpus_words, disable_offline_haystack, enable_offline_haystack, split_sentences,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random GDN + SWA model with the shipped tokenizer. Untied, larger weights than the default
    initialisation so that its greedy continuations depend on the context (a default-initialised tied model just
    repeats its last token, which would hide padding errors)."""
    with open(os.path.join(ROOT, "configs", "tiny_gdn_swa.json")) as f:
        cfg = json.load(f)
    cfg.update(tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    path = str(tmp_path_factory.mktemp("tiny_fla"))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets", "tokenizer")).save_pretrained(path)
    return path


def _run(out, tasks, model_dir, seq_lengths, batch_size, limit, extra=()):
    harness.main([
        *extra, "--output_path", str(out), "--tasks", tasks,
        "--model_args", f"pretrained={model_dir},dtype=float32,max_length=16384,trust_remote_code=True,add_bos_token=True",
        "--metadata", json.dumps({"max_seq_lengths": seq_lengths}), "--batch_size", str(batch_size),
        "--limit", str(limit), "--gen_kwargs", "max_gen_toks=24", "--log_samples", "--trust_remote_code",
    ])
    results = json.load(open(sorted(glob.glob(os.path.join(str(out), "*", "results_*.json")))[-1]))
    samples = {}
    for task in tasks.split(","):
        files = glob.glob(os.path.join(str(out), "*", f"samples_{task}_*.jsonl"))
        assert len(files) == 1, files
        samples[task] = sorted((json.loads(line) for line in open(files[0])), key=lambda s: s["doc_id"])
    return results, samples


def test_niah_single_1_fla_backend_batched_equals_unbatched(model_dir, tmp_path):
    """The paper's command shape on niah_single_1: once with --model fla batched (left padding, use_cache), once
    with the stock hf backend one sample at a time; the generated answers are identical."""
    batched, s_batched = _run(tmp_path / "b", "niah_single_1", model_dir, [256], 4, 4, ["--model", "fla"])
    single, s_single = _run(tmp_path / "s", "niah_single_1", model_dir, [256], 1, 4)  # default model: hf
    assert batched["config"]["model"] == "fla" and single["config"]["model"] == "hf"
    for res in (batched, single):
        score = res["results"]["niah_single_1"]["256,none"]
        assert 0.0 <= score <= 1.0
    assert [s["doc_id"] for s in s_batched["niah_single_1"]] == [0, 1, 2, 3]
    lengths = {len(s["arguments"]["gen_args_0"]["arg_0"]) for s in s_batched["niah_single_1"]}
    assert len(lengths) > 1, "the prompts should differ in length so that the batch is padded"
    resps_b = [s["resps"][0][0] for s in s_batched["niah_single_1"]]
    resps_s = [s["resps"][0][0] for s in s_single["niah_single_1"]]
    assert resps_b == resps_s
    assert len(set(resps_b)) > 1, "a context-independent model would make this comparison vacuous"


def test_niah_single_2_offline(model_dir, tmp_path, monkeypatch):
    """niah_single_2 (essay haystack) runs with no hub dataset and no nltk model: the haystack is the shipped
    corpus and the sentence splitter the regex one."""
    import datasets
    import nltk

    real_load = datasets.load_dataset

    def no_hub(path, *args, **kwargs):
        if "paul_graham" in str(path):
            raise AssertionError("offline mode must not load the essays from the hub")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.setattr(nltk, "sent_tokenize", lambda *a, **k: pytest.fail("nltk sent_tokenize was called"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        results, samples = _run(tmp_path / "o", "niah_single_2", model_dir, [1024], 2, 2, ["--offline"])
    finally:
        disable_offline_haystack()
    assert 0.0 <= results["results"]["niah_single_2"]["1024,none"] <= 1.0
    prompt = samples["niah_single_2"][0]["arguments"]["gen_args_0"]["arg_0"]
    assert " ".join(corpus_words()[:100]) in prompt  # the shipped corpus is the haystack
    assert samples["niah_single_2"][0]["doc"]["outputs"][0] in prompt  # the needle is in it


def test_fla_backend_batched_equals_unbatched_direct(model_dir):
    """lm-eval's generate_until through the `fla` model: prompts of very different lengths in one left-padded
    batch give the same continuations as one at a time."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    harness.register_models()
    words = open(os.path.join(ROOT, "assets", "README.md")).read().split()
    prompts = [" ".join(words[i:i + n]) for i, n in [(0, 3), (10, 60), (100, 25), (200, 110), (300, 7)]]
    outs = []
    for batch_size in (5, 1):
        lm = get_model("fla")(pretrained=model_dir, batch_size=batch_size, dtype="float32", add_bos_token=True,
                              device="cpu")
        reqs = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 16, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
        outs.append(lm.generate_until(reqs))
    assert outs[0] == outs[1]
    assert len(set(outs[0])) == len(prompts)


def test_fla_backend_rejects_other_models(tmp_path):
    from lm_eval.api.registry import get_model

    harness.register_models()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="allowed model types: .*gated_deltanet"):
        get_model("fla")(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="no config.json"):
        get_model("fla")(pretrained=str(tmp_path / "missing"))


def test_offline_setting(monkeypatch):
    for var in ("FLA_EVAL_OFFLINE", "FLA_EVAL_HAYSTACK", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert harness.offline_setting() == (False, None)
    assert harness.offline_setting(offline_flag=True) == (True, None)
    assert harness.offline_setting(haystack="x.txt") == (True, "x.txt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert harness.offline_setting() == (True, None)
    monkeypatch.setenv("FLA_EVAL_OFFLINE", "0")
    assert harness.offline_setting() == (False, None)
    monkeypatch.setenv("FLA_EVAL_HAYSTACK", "corpus.txt")
    assert harness.offline_setting() == (True, "corpus.txt")
    monkeypatch.setenv("FLA_EVAL_OFFLINE", "maybe")
    monkeypatch.delenv("FLA_EVAL_HAYSTACK")
    with pytest.raises(ValueError, match="FLA_EVAL_OFFLINE='maybe'.*use one of"):
        harness.offline_setting()


def test_offline_haystack_patch_and_errors(tmp_path, capsys):
    import lm_eval.tasks.ruler.prepare_niah as prepare_niah

    with pytest.raises(SystemExit):
        harness.main(["--haystack", str(tmp_path / "nope"), "--tasks", "niah_single_2"])
    assert "error: haystack corpus" in capsys.readouterr().err

    with pytest.raises(FileNotFoundError, match="does not exist"):
        enable_offline_haystack(str(tmp_path / "nope"))
    text = tmp_path / "hay.txt"
    text.write_text("Alpha beta.  Gamma\ndelta!\n\nEpsilon?")
    try:
        assert enable_offline_haystack(str(text)) == str(text)
        assert prepare_niah.get_haystack("essay") == ["Alpha", "beta.", "Gamma", "delta!", "Epsilon?"]
        assert prepare_niah.get_haystack("repeat").startswith("The grass is green.")  # untouched
        assert prepare_niah.cached_sent_tokenize("Alpha beta. Gamma delta! Epsilon?") == [
            "Alpha beta.", "Gamma delta!", "Epsilon?"]
    finally:
        disable_offline_haystack()
    assert prepare_niah.get_haystack.__module__ == "lm_eval.tasks.ruler.prepare_niah"


def test_split_sentences():
    text = ('Mr. Smith went to Washington. He said "Hello there." Then he left! Did he? Yes: in 1984. '
            'J. R. R. Tolkien wrote e.g. books. The end')
    sentences = split_sentences(text)
    assert sentences == ["Mr. Smith went to Washington.", 'He said "Hello there."', "Then he left!", "Did he?",
                         "Yes: in 1984.", "J. R. R. Tolkien wrote e.g. books.", "The end"]
    assert " ".join(sentences) == text
    assert split_sentences("") == [] and split_sentences("no end") == ["no end"]
    words = corpus_words(DEFAULT_CORPUS)
    sample = " ".join(words[:5000])
    assert " ".join(split_sentences(sample)) == sample
