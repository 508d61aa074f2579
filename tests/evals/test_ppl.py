"""evals.ppl: packing, perplexity overall and by position, checked on models with known answers; CLI outputs."""

import csv
import json
import math
import os

import pytest
import torch

import fla  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from evals import ppl
from evals.common import EvalArgumentError
from evals.reference_models import PeekingOracleLM, UniformLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "assets", "tokenizer")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return ppl.pack_documents(ppl.load_texts(split="validation"), tokenizer, block_size=64, max_blocks=6)


def test_pack_documents(tokenizer, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 20)
    texts = ppl.load_texts(str(text))
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    blocks = ppl.pack_documents(texts, tokenizer, block_size=16)
    stream = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[:blocks.numel()]
    assert ppl.pack_documents(texts, tokenizer, block_size=16, max_blocks=2).shape == (2, 16)
    with pytest.raises(EvalArgumentError, match="block_size=100000"):
        ppl.pack_documents(texts, tokenizer, block_size=100000)
    with pytest.raises(EvalArgumentError, match="block_size=1: must be an integer >= 2"):
        ppl.pack_documents(texts, tokenizer, block_size=1)


def test_load_texts_from_a_data_file_and_a_dataset_folder(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one doc", "another doc"])))
    assert list(ppl.load_texts(str(data), split="train")) == ["one doc", "another doc"]
    validation = list(ppl.load_texts(split="validation"))  # the shipped corpus folder
    assert len(validation) == 7 and all(isinstance(t, str) and t for t in validation)


def test_uniform_model_perplexity_is_vocab_size(blocks):
    V = 8192
    r = ppl.evaluate_perplexity(UniformLM(V), blocks, batch_size=4, bucket_size=10, progress=False)
    assert r["ppl"] == pytest.approx(V, rel=1e-6)
    assert r["tokens"] == blocks.shape[0] * 63 and r["blocks"] == blocks.shape[0]
    assert [(b["start"], b["end"]) for b in r["buckets"]] == [(0, 10), (10, 20), (20, 30), (30, 40), (40, 50),
                                                              (50, 60), (60, 64)]
    assert [b["tokens"] for b in r["buckets"]] == [blocks.shape[0] * n for n in (9, 10, 10, 10, 10, 10, 4)]
    assert all(b["ppl"] == pytest.approx(V, rel=1e-6) for b in r["buckets"])
    assert len(r["loss_by_position"]) == 63


def test_oracle_perplexity_is_one(blocks):
    r = ppl.evaluate_perplexity(PeekingOracleLM(8192), blocks, batch_size=4, progress=False)
    assert r["ppl"] == pytest.approx(1.0, abs=1e-6)
    assert r["bucket_size"] == 4 and len(r["buckets"]) == 16


def test_tiny_model_matches_its_own_loss(blocks):
    """The per-position losses average to the model's own (labels=) loss on the same blocks."""
    with open(os.path.join(ROOT, "configs", "tiny_gdn_swa.json")) as f:
        config = AutoConfig.for_model(**json.load(f))
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    r = ppl.evaluate_perplexity(model, blocks, batch_size=3, progress=False)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=blocks, labels=blocks).loss.item()
    assert r["loss"] == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(r["ppl"])


def test_cli_writes_json_csv_and_plot(tmp_path):
    with open(os.path.join(ROOT, "configs", "tiny_gdn_swa.json")) as f:
        config = AutoConfig.for_model(**json.load(f))
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    paths = []
    for name in ("a", "b"):
        torch.manual_seed(len(paths))
        path = tmp_path / name / "hf"
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path))
    out = tmp_path / "out"
    results = ppl.main(["--model", *paths, f"random-init:{paths[1]}", "--block_size", "32", "--max_blocks", "4",
                        "--bucket_size", "8", "--batch_size", "2", "--device", "cpu", "--output", str(out)])
    assert [r["name"] for r in results] == ["a", "b", "random-init-b"]
    # b's configuration initialised afresh from seed 0, i.e. model a's weights, hence a's perplexity
    assert results[2]["ppl"] == pytest.approx(results[0]["ppl"], rel=1e-6) and results[2]["ppl"] != results[1]["ppl"]
    for name in ("a", "b"):
        saved = json.load(open(out / f"{name}.json"))
        assert saved["tokens"] == 4 * 31 and len(saved["buckets"]) == 4
        rows = list(csv.DictReader(open(out / f"{name}.csv")))
        assert [r["start"] for r in rows] == ["0", "8", "16", "24", "all"]
        assert float(rows[-1]["ppl"]) == pytest.approx(saved["ppl"], rel=1e-3)
    from evals.common import load_model, model_name

    rng = torch.get_rng_state()
    fresh, _ = load_model(f"random-init:{paths[1]}", device="cpu")
    assert torch.equal(torch.get_rng_state(), rng) and not fresh.training  # the caller's random stream is untouched
    assert model_name(f"random-init:{paths[1]}") == "random-init-b" and model_name(paths[0]) == "a"
    png = out / "loss_by_position.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    replot = tmp_path / "re.png"
    ppl.main(["--plot_from", str(out / "a.json"), str(out / "b.json"), "--plot", str(replot)])
    assert replot.stat().st_size > 1000


def test_bad_arguments(blocks, tmp_path, capsys):
    with pytest.raises(EvalArgumentError, match="bucket_size=0"):
        ppl.evaluate_perplexity(UniformLM(8192), blocks, bucket_size=0, progress=False)
    with pytest.raises(EvalArgumentError, match="batch_size=-1"):
        ppl.evaluate_perplexity(UniformLM(8192), blocks, batch_size=-1, progress=False)
    with pytest.raises(EvalArgumentError, match="--data=.*does not exist"):
        ppl.load_texts(str(tmp_path / "missing" / "data.jsonl"))
    with pytest.raises(SystemExit):
        ppl.main(["--model", str(tmp_path), "--dtype", "fp8"])
    assert "--dtype: invalid choice: 'fp8' (choose from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ppl.main(["--model", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert f"model={str(tmp_path)!r}: {str(tmp_path)!r} is not a save_pretrained directory (no config.json)" in err
    with pytest.raises(SystemExit):
        ppl.main(["--model", f"random-init:{tmp_path}", "--device", "cpu"])
    assert f"model='random-init:{tmp_path}': {str(tmp_path)!r} is not a save_pretrained directory" in \
        capsys.readouterr().err
