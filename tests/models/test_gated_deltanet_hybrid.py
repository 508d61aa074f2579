"""Gated DeltaNet + attention hybrids (``model_type='gated_deltanet'`` with an ``attn`` dict): the paper's GDN+SWA
and GDN+Attn configs (state-dict keys, parameter counts), layer layout, init, padding == packing, cached decoding and
generation with left padding (sliding window smaller than the sequence), save/load."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import fla  # noqa: F401  (registers the models)
from fla.layers import Attention, GatedDeltaNet
from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from fla.models.gated_deltanet import GatedDeltaNetBlock
from fla.modules import rotary_inv_freq
from fla.utils.testing import assert_close
from tests.models.helpers import check_cached_decoding, check_padded_equals_packed, greedy_reference, left_padded_batch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V = 64


def tiny_model(device, window_size=None, **kwargs):
    options = dict(hidden_size=32, head_dim=8, num_heads=4, expand_v=1, num_hidden_layers=3, vocab_size=V,
                   pad_token_id=0, initializer_range=0.05,
                   attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": window_size})
    options.update(kwargs)
    return AutoModelForCausalLM.from_config(GatedDeltaNetConfig(**options)).to(device)


PAPER = [  # name, hidden, GDN head dim, attention q / kv heads, window, tied, parameters
    ("gated_delta_net_swa_0.4B", 1024, 128, 16, 16, 1024, True, 354_028_224),
    ("gated_delta_net_swa_1.4B", 2048, 256, 32, 8, 1024, False, 1_339_823_296),
    ("gated_delta_net_attn_0.4B", 1024, 128, 16, 16, None, True, 354_028_224),
    ("gated_delta_net_attn_1.4B", 2048, 256, 32, 8, None, False, 1_339_823_296),
]


@pytest.mark.parametrize("name, Hs, dk, heads, kv_heads, window, tied, total", PAPER, ids=[p[0] for p in PAPER])
def test_paper_configs_state_dict_and_parameter_count(name, Hs, dk, heads, kv_heads, window, tied, total):
    config = AutoConfig.from_pretrained(CONFIGS / f"{name}.json")
    assert isinstance(config, GatedDeltaNetConfig) and config.model_type == "gated_deltanet"
    assert config.attn == {"layers": list(range(1, 24, 2)), "num_heads": heads, "num_kv_heads": kv_heads,
                           "qkv_bias": False, "window_size": window, "rope_theta": 10000.0}
    assert (config.num_hidden_layers, config.max_position_embeddings, config.tie_word_embeddings) == (24, 4096, tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n, hd = 8, Hs // heads
    inter = 256 * math.ceil(int(Hs * 4 * 2 / 3) / 256)
    shapes = {"model.embeddings.weight": (32000, Hs), "model.norm.weight": (Hs,), "lm_head.weight": (32000, Hs)}
    for i in range(24):
        p = f"model.layers.{i}."
        shapes.update({p + "attn_norm.weight": (Hs,), p + "mlp_norm.weight": (Hs,),
                       p + "mlp.gate_proj.weight": (inter, Hs), p + "mlp.up_proj.weight": (inter, Hs),
                       p + "mlp.down_proj.weight": (Hs, inter)})
        if i % 2:
            shapes.update({p + "attn.q_proj.weight": (Hs, Hs), p + "attn.k_proj.weight": (kv_heads * hd, Hs),
                           p + "attn.v_proj.weight": (kv_heads * hd, Hs), p + "attn.o_proj.weight": (Hs, Hs)})
        else:
            shapes.update({
                p + "attn.A_log": (n,), p + "attn.dt_bias": (n,),
                p + "attn.q_proj.weight": (n * dk, Hs), p + "attn.k_proj.weight": (n * dk, Hs),
                p + "attn.v_proj.weight": (n * dk, Hs), p + "attn.a_proj.weight": (n, Hs),
                p + "attn.b_proj.weight": (n, Hs), p + "attn.q_conv1d.weight": (n * dk, 1, 4),
                p + "attn.k_conv1d.weight": (n * dk, 1, 4), p + "attn.v_conv1d.weight": (n * dk, 1, 4),
                p + "attn.g_proj.weight": (n * dk, Hs), p + "attn.o_norm.weight": (dk,),
                p + "attn.o_proj.weight": (Hs, n * dk)})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == total
    layers = model.model.layers
    assert all(type(layer) is GatedDeltaNetBlock for layer in layers)  # one block class, the mixer differs
    assert all(isinstance(layers[i].attn, Attention if i % 2 else GatedDeltaNet) for i in range(24))
    assert layers[1].attn.window_size == window and layers[1].attn.head_dim == 64


def test_attention_first_layer_and_config_errors(device):
    """Attention at layer 0 (the cache's first slot; generate reads its length there) and at the last layer."""
    model = tiny_model(device, attn={"layers": [0, 2], "num_heads": 2}).eval()
    assert [type(layer.attn) for layer in model.model.layers] == [Attention, GatedDeltaNet, Attention]
    assert model.model.layers[0].attn.head_dim == 16 and model.model.layers[0].attn.num_kv_heads == 2
    ids, mask = left_padded_batch([5, 3], 5, device, V)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, 5:], greedy_reference(model, ids, mask, 3))
    with pytest.raises(ValueError, match="layer indices"):
        GatedDeltaNetConfig(attn={"layers": 1, "num_heads": 2})


def test_meta_device_construction_then_to_empty_and_post_init(device):
    config = GatedDeltaNetConfig(hidden_size=64, head_dim=16, num_heads=4, expand_v=1, num_hidden_layers=2,
                                 vocab_size=V, attn={"layers": [1], "num_heads": 4, "window_size": 8})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device=device)
    for module in model.modules():
        module._is_hf_initialized = False
    with torch.no_grad():
        model.post_init()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    gdn, attn = model.model.layers[0].attn, model.model.layers[1].attn
    assert (gdn.A_log.exp() <= 16 * (1 + 1e-6)).all()
    dt = F.softplus(gdn.dt_bias)
    assert ((dt >= 1e-3 * (1 - 1e-4)) & (dt <= 0.1 * (1 + 1e-4))).all()
    assert torch.equal(attn.rotary.inv_freq, rotary_inv_freq(16, 10000.0, device))
    x = torch.randint(1, V, (1, 6), device=device)
    assert torch.isfinite(model(x, labels=x).loss)


def test_forward_backward(device):
    model = tiny_model(device, window_size=3).train()
    ids = torch.randint(0, V, (2, 10), device=device)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("window_size", [None, 3])
def test_padded_batch_equals_packed_batch(device, window_size):
    model = tiny_model(device, window_size).eval()
    ids, mask = left_padded_batch([9, 4, 7], 9, device, V)
    check_padded_equals_packed(model, ids, mask, 1e-4)


@pytest.mark.parametrize("window_size", [None, 4, 8])
def test_cached_decoding_with_left_padding_matches_full_forward(device, window_size):
    model = tiny_model(device, window_size).eval()
    cache = check_cached_decoding(model, 12, 4, device, V, 1e-4)
    k = cache[1]["attn_state"][0]
    assert k.shape[1] == (12 if window_size is None else window_size)  # the SWA cache stays bounded
    if window_size is not None:  # ... also in memory: after a 12-token prompt the state is no view into it
        assert k.untyped_storage().nbytes() == k.numel() * k.element_size()
    assert cache[0]["attn_state"] is None and cache[0]["recurrent_state"] is not None


def test_plain_forward_cache_continues(device):
    model = tiny_model(device, window_size=4).eval()
    ids = torch.randint(1, V, (2, 11), device=device)
    full = model(ids).logits
    first = model(ids[:, :6], use_cache=True)
    second = model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    assert_close("continued", torch.cat([first.logits, second.logits], 1), full, 1e-4)


@pytest.mark.parametrize("window_size", [None, 3])
def test_generate_greedy_with_left_padding(device, window_size):
    model = tiny_model(device, window_size).eval()
    ids, mask = left_padded_batch([6, 1] + torch.randint(1, 7, (2,)).tolist(), 6, device, V)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 11) and torch.equal(out[:, :6], ids)
    assert torch.equal(out[:, 6:], greedy_reference(model, ids, mask, 5))


def test_save_pretrained_round_trip(device, tmp_path):
    model = tiny_model(device, window_size=3).eval()
    ids = torch.randint(1, V, (2, 7), device=device)
    ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(device).eval()
    assert isinstance(loaded, GatedDeltaNetForCausalLM) and loaded.config.attn == model.config.attn
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert_close("logits", loaded(ids).logits, ref, 0)


def test_backbone_checks_the_padding_mask_once(device):
    """The backbone hands every token mixer the mask's last T columns, or None when they hold no padding (one host
    read per forward instead of one per layer); outputs are those of the unmasked / full-mask call."""
    model = tiny_model(device, window_size=4).eval()
    seen = []
    for layer in model.model.layers:
        layer.attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    ids = torch.randint(1, V, (2, 7), device=device)
    with torch.no_grad():
        plain = model(ids).logits
        ones = model(ids, attention_mask=torch.ones(2, 9, dtype=torch.long, device=device)).logits
    assert len(seen) == 6 and all(m is None for m in seen)
    assert_close("all-real mask", ones, plain, 0)
    seen.clear()
    mask = torch.ones(2, 9, dtype=torch.long, device=device)
    mask[0, :4] = 0  # columns 0-1 lie before this call's 7 tokens; columns 2-3 pad its first two
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        tail = model(ids, attention_mask=mask[:, 2:]).logits
    assert len(seen) == 6 and all(m is not None and tuple(m.shape) == (2, 7) for m in seen)
    assert torch.equal(seen[0].bool(), mask[:, 2:].bool())
    assert_close("padded", padded, tail, 0)
