"""NSA causal LM: registration, paper configs (state-dict keys, parameter counts), meta-device init, padding ==
packing, cached decoding and generation with left padding, chunked continuation, save/load."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import fla  # noqa: F401  (registers the models)
from fla.models.nsa import NSAConfig, NSAForCausalLM, NSAModel
from fla.modules import rotary_inv_freq
from fla.utils.testing import assert_close
from tests.models.helpers import check_cached_decoding, check_padded_equals_packed, greedy_reference, left_padded_batch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V = 64


def tiny_model(device, **kwargs):
    options = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, block_counts=3,
                   window_size=5, num_hidden_layers=2, vocab_size=V, pad_token_id=0, initializer_range=0.05)
    options.update(kwargs)
    return AutoModelForCausalLM.from_config(NSAConfig(**options)).to(device)


def test_auto_classes(tmp_path):
    config = AutoConfig.for_model("nsa", hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                  num_hidden_layers=1, vocab_size=V)
    assert isinstance(config, NSAConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), NSAForCausalLM)
    assert isinstance(AutoModel.from_config(config), NSAModel)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "nsa"
    assert AutoConfig.from_pretrained(tmp_path).head_dim == 8


@pytest.mark.parametrize("name, hidden, tied, total, mixer", [
    ("nsa_0.4B", 1024, True, 349_750_272, 4_554_752),
    ("nsa_1.4B", 2048, False, 1_180_272_640, 9_109_504),
])
def test_paper_configs_state_dict_and_parameter_count(name, hidden, tied, total, mixer):
    config = AutoConfig.from_pretrained(CONFIGS / f"{name}.json")
    assert isinstance(config, NSAConfig)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (32, 2, 64)
    assert (config.block_size, config.block_counts, config.window_size) == (64, 16, 512)
    assert (config.num_hidden_layers, config.vocab_size, config.max_position_embeddings) == (24, 32000, 4096)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert (config.initializer_range, config.rope_theta, config.tie_word_embeddings) == (0.006, 10000.0, tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    Hs = hidden
    inter = 256 * math.ceil(int(Hs * 4 * 2 / 3) / 256)
    shapes = {"model.embeddings.weight": (32000, Hs), "model.norm.weight": (Hs,), "lm_head.weight": (32000, Hs)}
    for i in range(24):
        p = f"model.layers.{i}."
        shapes.update({p + "attn_norm.weight": (Hs,), p + "mlp_norm.weight": (Hs,),
                       p + "mlp.gate_proj.weight": (inter, Hs), p + "mlp.up_proj.weight": (inter, Hs),
                       p + "mlp.down_proj.weight": (Hs, inter),
                       p + "attn.q_proj.weight": (32 * 64, Hs), p + "attn.k_proj.weight": (2 * 64, Hs),
                       p + "attn.v_proj.weight": (2 * 64, Hs), p + "attn.g_proj.weight": (3 * 32, Hs),
                       p + "attn.o_proj.weight": (Hs, 32 * 64)})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.model.layers[0].attn.parameters()) == mixer
    assert (model.lm_head.weight is model.model.embeddings.weight) == tied


def test_meta_device_construction_then_to_empty_and_post_init(device):
    config = NSAConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, block_counts=2,
                       window_size=3, num_hidden_layers=2, vocab_size=V, pad_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device=device)
    for module in model.modules():
        module._is_hf_initialized = False
    with torch.no_grad():
        model.post_init()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    for layer in model.model.layers:
        assert torch.equal(layer.attn.rotary.inv_freq, rotary_inv_freq(16, 10000.0, device))
    assert abs(model.model.layers[0].attn.q_proj.weight.std().item() - 0.006) < 0.001
    x = torch.randint(1, V, (1, 9), device=device)
    assert torch.isfinite(model(x, labels=x).loss)


def test_forward_backward(device):
    model = tiny_model(device).train()
    ids = torch.randint(0, V, (2, 13), device=device)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_padded_batch_equals_packed_batch(device):
    model = tiny_model(device).eval()
    ids, mask = left_padded_batch([11, 4, 9], 11, device, V)
    check_padded_equals_packed(model, ids, mask, 1e-5)


def test_cached_decoding_with_left_padding_matches_full_forward(device):
    model = tiny_model(device).eval()
    cache = check_cached_decoding(model, 20, 4, device, V, 1e-5)
    assert all(state["nsa_cmp_state"] is not None for state in cache)


def test_plain_forward_cache_continues(device):
    model = tiny_model(device).eval()
    ids = torch.randint(1, V, (2, 17), device=device)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :6], use_cache=True)
        second = model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    assert_close("continued", torch.cat([first.logits, second.logits], 1), full, 1e-5)


def test_generate_greedy_with_left_padding(device):
    model = tiny_model(device).eval()
    ids, mask = left_padded_batch([8, 1] + torch.randint(1, 9, (2,)).tolist(), 8, device, V)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 14) and torch.equal(out[:, :8], ids)
    assert torch.equal(out[:, 8:], greedy_reference(model, ids, mask, 6))
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (4, 11)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_pretrained_round_trip(device, tmp_path, tied):
    model = tiny_model(device, tie_word_embeddings=tied).eval()
    ids = torch.randint(1, V, (2, 9), device=device)
    ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(device).eval()
    assert isinstance(loaded, NSAForCausalLM)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert_close("logits", loaded(ids).logits, ref, 0)
