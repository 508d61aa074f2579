"""evals.recall: synthetic MQAR / needle generation, scoring checked on models with known answers, CLI."""

import json
import os

import pytest
import torch

import fla  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from evals import recall
from evals.common import EvalArgumentError
from evals.reference_models import InductionOracleLM, PeekingOracleLM, UniformLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "assets", "tokenizer")
V = 8192


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def test_token_pools(tokenizer):
    keys, values, filler = recall.token_pools(tokenizer, V, seed=3)
    ids = torch.cat([keys, values, filler]).tolist()
    assert len(ids) == len(set(ids)) == V - len(set(tokenizer.all_special_ids))
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert torch.equal(recall.token_pools(tokenizer, V, seed=3)[0], keys)


def test_mqar_layout(tokenizer):
    keys, values, filler = pools = recall.token_pools(tokenizer, V)
    ids, mask = recall.make_mqar(pools, length=64, num_samples=3, num_kv_pairs=5, bos=1)
    assert ids.shape == mask.shape == (3, 64) and mask.sum(1).tolist() == [5, 5, 5]
    for row, m in zip(ids, mask):
        assert row[0] == 1
        kv = row[1:11].view(5, 2)
        assert set(kv[:, 0].tolist()) <= set(keys.tolist()) and len(set(kv[:, 0].tolist())) == 5
        assert set(row[11:54].tolist()) <= set(filler.tolist())
        pairs = dict(kv.tolist())
        queries = row[54:].view(5, 2)
        assert sorted(queries[:, 0].tolist()) == sorted(pairs)
        assert all(pairs[q] == a for q, a in queries.tolist())
        assert row[m].tolist() == queries[:, 1].tolist()


def test_needle_layout(tokenizer):
    pools = recall.token_pools(tokenizer, V)
    ids, mask = recall.make_needle(pools, length=40, num_samples=4, value_length=3, bos=None)
    assert ids.shape == (4, 40) and mask[:, -3:].all() and mask.sum() == 12
    for row in ids:
        needle = row[-4:].tolist()
        occurrences = [i for i in range(36) if row[i:i + 4].tolist() == needle]
        assert len(occurrences) == 1


@pytest.mark.parametrize("model_class, expected", [(PeekingOracleLM, 1.0), (InductionOracleLM, 1.0),
                                                     (UniformLM, 0.0)])
def test_known_models(tokenizer, model_class, expected):
    """An oracle (peeking, or an honest perfect induction head) scores 100%; equal logits (argmax = token 0, a
    special token never used as an answer) score 0%."""
    scores = recall.evaluate_recall(model_class(V), tokenizer, lengths=[32, 128], num_samples=6, value_length=2,
                                    batch_size=4)
    assert scores == {"mqar/32": expected, "mqar/128": expected, "needle/32": expected, "needle/128": expected}


def test_tiny_model_and_training_mode(tokenizer):
    with open(os.path.join(ROOT, "configs", "tiny_gdn_swa.json")) as f:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.load(f)))
    model.train()
    a = recall.evaluate_recall(model, tokenizer, lengths=[64, 96], num_samples=4, batch_size=3, seed=1)
    assert model.training
    assert set(a) == {"mqar/64", "mqar/96", "needle/64", "needle/96"}
    assert all(0.0 <= v <= 1.0 for v in a.values())
    assert recall.evaluate_recall(model, tokenizer, lengths=[64, 96], num_samples=4, batch_size=4, seed=1) == a


def test_bad_arguments(tokenizer):
    m = UniformLM(V)
    with pytest.raises(EvalArgumentError, match=r"tasks=\['mqr'\]: choose from \('mqar', 'needle'\)"):
        recall.evaluate_recall(m, tokenizer, [64], tasks=["mqr"])
    with pytest.raises(EvalArgumentError, match="lengths=4: must be an integer >= 8"):
        recall.evaluate_recall(m, tokenizer, [4])
    with pytest.raises(EvalArgumentError, match="lengths=64: must be a non-empty list"):
        recall.evaluate_recall(m, tokenizer, 64)
    with pytest.raises(EvalArgumentError, match="num_kv_pairs=20: 20 pairs and 20 queries need 81 tokens"):
        recall.evaluate_recall(m, tokenizer, [64], num_kv_pairs=20)
    with pytest.raises(EvalArgumentError, match="num_samples=0"):
        recall.evaluate_recall(m, tokenizer, [64], num_samples=0)


def test_cli(tmp_path, capsys):
    with open(os.path.join(ROOT, "configs", "tiny_gdn_swa.json")) as f:
        config = AutoConfig.for_model(**json.load(f))
    path = tmp_path / "run" / "hf"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(path)
    out = tmp_path / "recall.json"
    results = recall.main(["--model", str(path), "--lengths", "32", "64", "--num_samples", "4", "--device", "cpu",
                           "--output", str(out)])
    assert set(results["run"]) == {"mqar/32", "mqar/64", "needle/32", "needle/64"}
    assert json.load(open(out))["results"] == results
    assert "| run |" in capsys.readouterr().out
