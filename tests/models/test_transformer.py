"""Transformer causal LM: registration, paper configs (state-dict keys, parameter counts), init, padding == packing,
cached decoding and generation with left padding (full and sliding window), save/load."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import fla  # noqa: F401  (registers the models)
from fla.models import TransformerConfig, TransformerForCausalLM, TransformerModel
from fla.modules import rotary_inv_freq
from fla.utils.testing import assert_close
from tests.models.helpers import check_cached_decoding, check_padded_equals_packed, greedy_reference, left_padded_batch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V = 64


def tiny_model(device, **kwargs):
    options = dict(hidden_size=32, num_heads=4, num_kv_heads=2, num_hidden_layers=2, vocab_size=V, pad_token_id=0,
                   initializer_range=0.05)
    options.update(kwargs)
    return AutoModelForCausalLM.from_config(TransformerConfig(**options)).to(device)


def test_auto_classes(tmp_path):
    config = AutoConfig.for_model("transformer", hidden_size=32, num_heads=4, num_hidden_layers=1, vocab_size=V)
    assert isinstance(config, TransformerConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), TransformerForCausalLM)
    assert isinstance(AutoModel.from_config(config), TransformerModel)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "transformer"
    assert AutoConfig.from_pretrained(tmp_path).num_heads == 4


@pytest.mark.parametrize("name, hidden, heads, kv_heads, tied, total", [
    ("transformer_0.4B", 1024, 16, None, True, 341_099_520),
    ("transformer_1.4B", 2048, 32, 8, False, 1_213_302_784),
])
def test_paper_configs_state_dict_and_parameter_count(name, hidden, heads, kv_heads, tied, total):
    config = AutoConfig.from_pretrained(CONFIGS / f"{name}.json")
    assert isinstance(config, TransformerConfig)
    assert (config.hidden_size, config.num_heads, config.num_kv_heads, config.window_size) == (hidden, heads,
                                                                                            kv_heads, None)
    assert (config.num_hidden_layers, config.vocab_size, config.max_position_embeddings) == (24, 32000, 4096)
    assert (config.bos_token_id, config.eos_token_id, config.initializer_range, config.rope_theta) == (1, 2, 0.006,
                                                                                                   10000.0)
    assert config.tie_word_embeddings is tied
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    Hs, hd, kv = hidden, 64, (kv_heads or heads)
    inter = 256 * math.ceil(int(Hs * 4 * 2 / 3) / 256)
    shapes = {"model.embeddings.weight": (32000, Hs), "model.norm.weight": (Hs,), "lm_head.weight": (32000, Hs)}
    for i in range(24):
        p = f"model.layers.{i}."
        shapes.update({p + "attn_norm.weight": (Hs,), p + "mlp_norm.weight": (Hs,),
                       p + "mlp.gate_proj.weight": (inter, Hs), p + "mlp.up_proj.weight": (inter, Hs),
                       p + "mlp.down_proj.weight": (Hs, inter),
                       p + "attn.q_proj.weight": (Hs, Hs), p + "attn.k_proj.weight": (kv * hd, Hs),
                       p + "attn.v_proj.weight": (kv * hd, Hs), p + "attn.o_proj.weight": (Hs, Hs)})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == total
    assert (model.lm_head.weight is model.model.embeddings.weight) == tied


def test_meta_device_construction_then_to_empty_and_post_init(device):
    config = TransformerConfig(hidden_size=64, num_heads=4, num_hidden_layers=2, vocab_size=V, pad_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device=device)
    for module in model.modules():
        module._is_hf_initialized = False
    with torch.no_grad():
        model.post_init()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    for layer in model.model.layers:  # the non-persistent rotary buffer is recomputed, not left as garbage
        assert torch.equal(layer.attn.rotary.inv_freq, rotary_inv_freq(16, 10000.0, device))
    w = model.model.layers[0].attn.q_proj.weight
    assert abs(w.std().item() - 0.006) < 0.001
    x = torch.randint(1, V, (1, 6), device=device)
    assert torch.isfinite(model(x, labels=x).loss)


def test_forward_backward(device):
    model = tiny_model(device).train()
    ids = torch.randint(0, V, (2, 10), device=device)
    out = model(ids, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("window_size", [None, 3])
def test_padded_batch_equals_packed_batch(device, window_size):
    model = tiny_model(device, window_size=window_size).eval()
    ids, mask = left_padded_batch([9, 4, 7], 9, device, V)
    check_padded_equals_packed(model, ids, mask, 1e-5)


@pytest.mark.parametrize("window_size", [None, 4, 8])
def test_cached_decoding_with_left_padding_matches_full_forward(device, window_size):
    model = tiny_model(device, window_size=window_size).eval()

    def window_bounded(cache):
        if window_size is not None:
            for state in cache:
                for t in state["attn_state"]:
                    # bounded in shape and in memory: no view into a longer tensor (a prompt's keys)
                    assert t.shape[1] <= window_size
                    assert t.untyped_storage().nbytes() <= t.numel() * t.element_size()

    check_cached_decoding(model, 12, 4, device, V, 1e-5, on_step=window_bounded)


def test_plain_forward_cache_continues(device):
    model = tiny_model(device, window_size=5).eval()
    ids = torch.randint(1, V, (2, 11), device=device)
    full = model(ids).logits
    first = model(ids[:, :6], use_cache=True)
    second = model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    assert_close("continued", torch.cat([first.logits, second.logits], 1), full, 1e-5)


@pytest.mark.parametrize("window_size", [None, 3])
def test_generate_greedy_with_left_padding(device, window_size):
    model = tiny_model(device, window_size=window_size).eval()
    ids, mask = left_padded_batch([6, 1] + torch.randint(1, 7, (2,)).tolist(), 6, device, V)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 11) and torch.equal(out[:, :6], ids)
    assert torch.equal(out[:, 6:], greedy_reference(model, ids, mask, 5))
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (4, 9)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_pretrained_round_trip(device, tmp_path, tied):
    model = tiny_model(device, tie_word_embeddings=tied).eval()
    ids = torch.randint(1, V, (2, 7), device=device)
    ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(device).eval()
    assert isinstance(loaded, TransformerForCausalLM)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert_close("logits", loaded(ids).logits, ref, 0)
