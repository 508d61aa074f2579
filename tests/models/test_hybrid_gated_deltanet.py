"""Hybrid Gated DeltaNet (laLTE / laNSA): paper configs, init, padded == packed, cached decoding with left padding,
generate, round trip, routing statistics and the L1 controller on a real model."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fla.layers import LTEAttention, NativeSparseAttention
from fla.models import HybridGatedDeltaNetConfig, HybridGatedDeltaNetForCausalLM
from fla.utils.testing import assert_close
from tests.models.helpers import check_cached_decoding, check_padded_equals_packed, greedy_reference, left_padded_batch

V = 97
LTE_KEYS = {"attn_type": "lte", "conv_size": [3, 3], "conv_dilation": [1, 2], "dropout_prob": 0.0, "sink_size": 2,
            "routing_method": "sigmoid", "routing_grad": True, "routing_shared": "head", "l1_lambda_shared": "head",
            "l1_warmup_steps": 0, "routing_freeze_steps": 0, "l1_lambda_initial_steps": 0,
            "l1_lambda_update_steps": 4, "l1_lambda_tolerate": [0.95, 1.0], "l1_alpha": 1.5, "l1_alpha_neg": 2,
            "l1_lambda_init": 1e-9, "l1_lambda_min": 1e-9, "l1_lambda_max": 1.0}


def tiny_config(attn_type="lte", window_size=4, buffer_size=64, **overrides):
    attn = {"layers": [1, 3], "num_heads": 4, "num_kv_heads": 2, "window_size": window_size}
    if attn_type == "lte":
        attn.update(LTE_KEYS, buffer_size=buffer_size)
    else:
        attn.update(attn_type="nsa", head_dim=8, block_size=4, block_counts=2, window_size=window_size)
    attn.update(overrides)
    return HybridGatedDeltaNetConfig(hidden_size=32, num_hidden_layers=4, num_heads=2, head_dim=16, expand_v=1,
                                     vocab_size=V, pad_token_id=0, attn=attn, initializer_range=0.02)


def tiny_model(device, **kw):
    torch.manual_seed(0)
    model = HybridGatedDeltaNetForCausalLM(tiny_config(**kw)).to(device)
    for layer in model.model.layers:  # about half of the router scores positive, so eviction decides something
        if isinstance(layer.attn, LTEAttention):
            with torch.no_grad():
                layer.attn.router.conv_stack.proj.bias.zero_()
    return model


@pytest.mark.parametrize("name,total", [("gated_delta_net_lte_0.4B", 360_246_144),
                                        ("gated_delta_net_lte_1.4B", 1_342_932_256),
                                        ("gated_delta_net_nsa_0.4B", 358_353_600),
                                        ("gated_delta_net_nsa_1.4B", 1_323_308_224)])
def test_paper_configs(name, total):
    config = AutoConfig.from_pretrained(f"configs/{name}.json")
    assert config.model_type == "hybrid_gated_deltanet"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, HybridGatedDeltaNetForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == total
    kinds = [type(layer.attn).__name__ for layer in model.model.layers]
    mixer = "LTEAttention" if "lte" in name else "NativeSparseAttention"
    assert kinds == ["GatedDeltaNet", mixer] * 12
    keys = model.state_dict()
    if "lte" in name:
        kv = json.load(open(f"configs/{name}.json"))["attn"]["num_kv_heads"]
        assert keys["model.l1_lambda"].shape == (12, kv) and keys["model.num_kept"].shape == (12, kv)
        assert keys["model.layers.1.attn.router.conv_stack.convs.0.weight"].shape == (kv * 64, 128, 1, 3)
        assert keys["model.layers.1.attn.router.conv_stack.proj.weight"].shape == (kv, 16, 1, 1)
    else:
        assert "model.l1_lambda" not in keys
        assert keys["model.layers.1.attn.g_proj.weight"].shape == (96, model.config.hidden_size)


def test_missing_lte_key_is_reported():
    attn = {"layers": [1], "num_heads": 4, "window_size": 4, **LTE_KEYS}
    del attn["sink_size"]
    with pytest.raises(ValueError, match="sink_size"):
        HybridGatedDeltaNetConfig(hidden_size=32, attn=attn)
    with pytest.raises(ValueError, match="attn_type"):
        HybridGatedDeltaNetConfig(hidden_size=32, attn={"layers": [1], "num_heads": 4, "attn_type": "mamba"})


def test_meta_construction_then_post_init(device):
    with torch.device("meta"):
        model = HybridGatedDeltaNetForCausalLM(tiny_config())
    model = model.to_empty(device=device)
    with torch.no_grad():  # what to_empty may leave: garbage, here made visible
        for t in list(model.parameters()) + [model.model.l1_lambda, model.model.num_kept]:
            t.fill_(float("nan"))
    for module in model.modules():
        module._is_hf_initialized = False
    with torch.no_grad():
        model.post_init()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    router = model.model.layers[1].attn.router
    assert torch.equal(router.conv_stack.proj.bias, torch.full_like(router.conv_stack.proj.bias, 0.5))
    assert (model.model.l1_lambda == 0).all() and (model.model.num_kept == 0).all()
    gdn = model.model.layers[0].attn
    assert (gdn.A_log.exp() > 0).all() and (gdn.A_log.exp() <= 16).all() and gdn.A_log.std() > 0  # A ~ U(0, 16)


def test_routing_shared_all_ties_within_one_model_only(device):
    a = HybridGatedDeltaNetForCausalLM(tiny_config(routing_shared="all", l1_lambda_shared="all")).to(device)
    b = HybridGatedDeltaNetForCausalLM(tiny_config(routing_shared="all", l1_lambda_shared="all")).to(device)
    sa = [layer.attn.router.conv_stack for layer in a.model.layers if isinstance(layer.attn, LTEAttention)]
    sb = [layer.attn.router.conv_stack for layer in b.model.layers if isinstance(layer.attn, LTEAttention)]
    assert sa[0] is sa[1] and sb[0] is sb[1] and sa[0] is not sb[0]
    assert a.model.l1_lambda.shape == ()


def test_forward_backward_with_l1_controller(device):
    model = tiny_model(device).train()
    controller = model.lte_controller(seq_len=24)
    controller.initialize(0)
    controller.prepare_step(1)
    ids = torch.randint(1, V, (2, 24), device=device)
    out = model(ids, labels=ids)
    assert len(out.routing_stats) == 2 and [s.layer_idx for s in out.routing_stats] == [1, 3]
    with torch.no_grad():
        model.model.l1_lambda.fill_(0.1)
    loss = out.loss + controller.loss(out.routing_stats)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    controller.update(1)
    assert torch.isfinite(model.model.num_kept).all()


@pytest.mark.parametrize("attn_type", ["lte", "nsa"])
def test_padded_batch_equals_packed_batch(device, attn_type):
    model = tiny_model(device, attn_type=attn_type).eval()
    ids, mask = left_padded_batch([13, 5, 9], 13, device, V)
    check_padded_equals_packed(model, ids, mask, 1e-5)


@pytest.mark.parametrize("attn_type", ["lte", "nsa"])
def test_cached_decoding_with_left_padding_matches_full_forward(device, attn_type):
    """With a buffer larger than the sequence the cap never binds: streaming eviction keeps every selected token,
    which is what the cache-free forward attends to, so the logits must agree token by token."""
    model = tiny_model(device, attn_type=attn_type).eval()
    check_cached_decoding(model, 20, 6, device, V, 1e-4)


def test_lte_cache_stays_bounded(device):
    model = tiny_model(device, window_size=4, buffer_size=3).eval()
    ids = torch.randint(1, V, (2, 60), device=device)
    out = model(ids[:, :10], use_cache=True)
    cache = out.past_key_values
    sizes = {name: t.shape for name, t in cache[1]["lte_state"].items()}
    for t in range(10, 60):
        model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
    assert {name: t.shape for name, t in cache[1]["lte_state"].items()} == sizes
    assert sizes["k_cache"][1] == 4 + 1 + 3


def test_lte_cache_memory_does_not_grow_with_the_prompt(device):
    """After a long prefill the LTE state owns only its bounded tensors (no view into the prompt's keys)."""
    model = tiny_model(device, window_size=4, buffer_size=3).eval()
    with torch.no_grad():
        state = model(torch.randint(1, V, (2, 200), device=device), use_cache=True).past_key_values[1]["lte_state"]
    for name, t in state.items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


def test_generate_greedy_with_left_padding(device):
    model = tiny_model(device).eval()
    ids, mask = left_padded_batch([6, 1] + torch.randint(1, 7, (2,)).tolist(), 6, device, V)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 14) and torch.equal(out[:, :6], ids)
    assert torch.equal(out[:, 6:], greedy_reference(model, ids, mask, 8))
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    assert sampled.shape == (4, 10)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=3, do_sample=False, pad_token_id=0)
    assert beams.shape == (4, 9)  # the LTE cache state is reordered with the beams


def test_save_pretrained_round_trip(device, tmp_path):
    model = tiny_model(device).eval()
    with torch.no_grad():
        model.model.l1_lambda.fill_(0.25)
    ids = torch.randint(1, V, (2, 9), device=device)
    ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(device).eval()
    assert isinstance(loaded, HybridGatedDeltaNetForCausalLM)
    assert torch.equal(loaded.model.l1_lambda, model.model.l1_lambda)
    assert_close("round trip", loaded(ids).logits, ref, 1e-6)
    assert isinstance(loaded.model.layers[1].attn, LTEAttention)
    assert not isinstance(loaded.model.layers[1].attn, NativeSparseAttention)
