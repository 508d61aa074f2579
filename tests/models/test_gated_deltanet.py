"""Gated DeltaNet causal LM: HF registration, loss, padding == packing, cached decoding, generate, save/load, init.

Tiny models (hidden 32, 2 layers): the gated delta rule ops may still run their token-by-token reference on CPU.
"""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import fla  # noqa: F401  (registers the models)
from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM, GatedDeltaNetModel
from fla.modules import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss
from fla.utils.testing import assert_close
from tests.models.helpers import check_cached_decoding, check_padded_equals_packed, greedy_reference, left_padded_batch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V = 64


def tiny_config(**kwargs):
    options = dict(hidden_size=32, head_dim=8, num_heads=4, expand_v=1, num_hidden_layers=2, vocab_size=V,
                   pad_token_id=0, initializer_range=0.05)
    options.update(kwargs)
    return GatedDeltaNetConfig(**options)


def tiny_model(device, **kwargs):
    return AutoModelForCausalLM.from_config(tiny_config(**kwargs)).to(device)


# ---------------------------------------------------------------------------------------------------------------
# registration and configs


def test_auto_classes_after_import_fla(tmp_path):
    config = AutoConfig.for_model("gated_deltanet", hidden_size=32, head_dim=8, num_heads=4, num_hidden_layers=1,
                                  vocab_size=V)
    assert isinstance(config, GatedDeltaNetConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), GatedDeltaNetForCausalLM)
    assert isinstance(AutoModel.from_config(config), GatedDeltaNetModel)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gated_deltanet"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GatedDeltaNetConfig) and loaded.head_dim == 8


@pytest.mark.parametrize("name, hidden, head_dim, tied", [("gated_delta_net_0.4B", 1024, 128, True),
                                                           ("gated_delta_net_1.4B", 2048, 256, False)])
def test_paper_config_files(name, hidden, head_dim, tied):
    config = AutoConfig.from_pretrained(CONFIGS / f"{name}.json")
    assert isinstance(config, GatedDeltaNetConfig)
    assert (config.hidden_size, config.head_dim, config.num_heads, config.expand_v) == (hidden, head_dim, 8, 1)
    assert (config.num_hidden_layers, config.vocab_size, config.max_position_embeddings) == (24, 32000, 4096)
    assert (config.bos_token_id, config.eos_token_id, config.norm_eps, config.initializer_range) == (1, 2, 1e-6, 0.006)
    assert config.tie_word_embeddings is tied and config.attn is None
    assert config.fuse_norm and config.fuse_swiglu and config.fuse_cross_entropy
    assert not config.fuse_linear_cross_entropy


def test_import_fla_is_cheap_and_side_effect_free():
    code = (
        "import os, sys; env = dict(os.environ); import fla; "
        "assert dict(os.environ) == env, 'import fla changed the environment'; "
        "assert 'fla.ops.gated_delta_rule' not in sys.modules, 'import fla imported kernel modules'; "
        "from transformers import AutoConfig; assert AutoConfig.for_model('gated_deltanet').model_type"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attn_config_is_stored_and_normalised(tmp_path):
    attn = {"layers": [1], "num_heads": 4, "window_size": 16}
    config = tiny_config(attn=attn)
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).attn == config.attn
    assert config.attn == {"layers": [1], "num_heads": 4, "num_kv_heads": 4, "qkv_bias": False, "window_size": 16,
                           "rope_theta": 10000.0}
    assert "num_kv_heads" not in attn  # the caller's dict is not modified
    with pytest.raises(ValueError, match="layers"):
        tiny_config(attn={"num_heads": 4})
    # hybrid models (Attention at attn['layers']) are tested in test_gated_deltanet_hybrid.py


def test_unknown_config_keys_are_kept():
    assert tiny_config(routing_method="sigmoid").routing_method == "sigmoid"


# ---------------------------------------------------------------------------------------------------------------
# state dict and parameter counts of the paper's configs (meta device: nothing is allocated)


def expected_shapes(config):
    Hs, n, dk, dv = config.hidden_size, config.num_heads, config.head_dim, config.head_dim * config.expand_v
    inter = 256 * math.ceil(int(Hs * 4 * 2 / 3) / 256)
    shapes = {"model.embeddings.weight": (32000, Hs), "model.norm.weight": (Hs,), "lm_head.weight": (32000, Hs)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "attn_norm.weight": (Hs,), p + "mlp_norm.weight": (Hs,),
            p + "mlp.gate_proj.weight": (inter, Hs), p + "mlp.up_proj.weight": (inter, Hs),
            p + "mlp.down_proj.weight": (Hs, inter),
            p + "attn.A_log": (n,), p + "attn.dt_bias": (n,),
            p + "attn.q_proj.weight": (n * dk, Hs), p + "attn.k_proj.weight": (n * dk, Hs),
            p + "attn.v_proj.weight": (n * dv, Hs),
            p + "attn.a_proj.weight": (n, Hs), p + "attn.b_proj.weight": (n, Hs),
            p + "attn.q_conv1d.weight": (n * dk, 1, 4), p + "attn.k_conv1d.weight": (n * dk, 1, 4),
            p + "attn.v_conv1d.weight": (n * dv, 1, 4), p + "attn.g_proj.weight": (n * dv, Hs),
            p + "attn.o_norm.weight": (dv,), p + "attn.o_proj.weight": (Hs, n * dv),
        })
    return shapes, inter


@pytest.mark.parametrize("name, total, inter", [("gated_delta_net_0.4B", 366_956_928, 2816),
                                                 ("gated_delta_net_1.4B", 1_466_343_808, 5632)])
def test_paper_config_state_dict(name, total, inter):
    config = AutoConfig.from_pretrained(CONFIGS / f"{name}.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes, expected_inter = expected_shapes(config)
    assert expected_inter == inter
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == total  # tied embeddings are counted once
    assert (model.lm_head.weight is model.model.embeddings.weight) == config.tie_word_embeddings


# ---------------------------------------------------------------------------------------------------------------
# init


def test_meta_device_construction_then_to_empty_and_post_init(device):
    config = tiny_config(tie_word_embeddings=True, initializer_range=0.006, hidden_size=64, num_heads=8)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device=device)
    # what flame does: mark everything uninitialised, then run the model's own init
    for module in model.modules():
        module._is_hf_initialized = False
    with torch.no_grad():
        model.post_init()
    assert model.lm_head.weight is model.model.embeddings.weight
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    for layer in model.model.layers:
        attn = layer.attn
        A = attn.A_log.exp()
        assert ((A > 0) & (A <= 16 * (1 + 1e-6))).all()
        dt = F.softplus(attn.dt_bias)
        assert ((dt >= 1e-3 * (1 - 1e-4)) & (dt <= 0.1 * (1 + 1e-4))).all()
        assert attn.A_log._no_weight_decay and attn.dt_bias._no_weight_decay
        assert torch.all(layer.attn_norm.weight == 1) and torch.all(attn.o_norm.weight == 1)
    w = model.model.layers[0].mlp.gate_proj.weight
    assert abs(w.std().item() - 0.006) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.all(model.model.embeddings.weight[0] == 0)  # padding row
    x = torch.randint(1, V, (1, 6), device=device)
    assert torch.isfinite(model(x, labels=x).loss)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_fsdp2_meta_construction_initialises_sharded_decay_parameters():
    """flame's path: meta device -> fully_shard (DTensor parameters) -> to_empty -> post_init. The reference skipped
    sharded A_log / dt_bias and left them as uninitialised memory; here they are drawn like any parameter."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(tiny_config())
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        for module in model.modules():
            module._is_hf_initialized = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DTensor random ops on a CPU mesh warn about partial support
            with torch.no_grad():
                model.post_init()
        for layer in model.model.layers:
            assert isinstance(layer.attn.A_log, DTensor)
            A_log, dt_bias = layer.attn.A_log.full_tensor(), layer.attn.dt_bias.full_tensor()
            assert torch.isfinite(A_log).all() and (A_log.exp() <= 16 * (1 + 1e-6)).all()
            dt = F.softplus(dt_bias)
            assert ((dt >= 1e-3 * (1 - 1e-4)) & (dt <= 0.1 * (1 + 1e-4))).all()
        x = torch.randint(1, V, (2, 6))
        assert torch.isfinite(model(x, labels=x).loss)
    finally:
        dist.destroy_process_group()


def test_rescale_prenorm_residual_strategy(device):
    """'rescale': o_proj / down_proj ~ U(+-1/sqrt(fan_in)) / sqrt(2 * layers); the other linears stay N(0, std)."""
    model = tiny_model(device, prenorm_residual_strategy="rescale", num_hidden_layers=3)
    for w in (model.model.layers[0].attn.o_proj.weight, model.model.layers[2].mlp.down_proj.weight):
        bound = 1 / math.sqrt(w.shape[1]) / math.sqrt(2 * 3)
        assert 0.9 * bound < w.abs().max() <= bound + 1e-6
    q = model.model.layers[0].attn.q_proj.weight
    assert abs(q.std().item() - 0.05) < 0.01
    with pytest.raises(ValueError, match="prenorm_residual_strategy"):
        tiny_model(device, prenorm_residual_strategy="scale")


# ---------------------------------------------------------------------------------------------------------------
# loss


def test_forward_backward_loss(device):
    model = tiny_model(device).train()
    ids = torch.randint(0, V, (2, 10), device=device)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close("loss", out.loss, ref, 1e-5)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_criterion_override_and_linear_cross_entropy(device):
    model = tiny_model(device).train()
    ids = torch.randint(0, V, (2, 9), device=device)
    ref = model(ids, labels=ids)

    class Recording(nn.Module):
        ignore_index = -100

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, logits, target):
            self.calls += 1
            return F.cross_entropy(logits, target) * 0 + 7.0

    model.criterion = Recording()
    out = model(ids, labels=ids)
    assert model.criterion.calls == 1 and out.loss.item() == 7.0

    model.criterion = FusedLinearCrossEntropyLoss(num_chunks=2)  # what flame assigns
    out = model(ids, labels=ids)
    assert out.logits is None
    assert_close("flce", out.loss, ref.loss, 1e-5)

    model.criterion = None
    model.config.fuse_linear_cross_entropy = True
    out = model(ids, labels=ids)
    assert out.logits is None
    assert_close("config flce", out.loss, ref.loss, 1e-5)
    model.eval()  # FLCE only while training: evaluation returns logits
    assert model(ids, labels=ids).logits is not None

    model.config.fuse_linear_cross_entropy, model.config.fuse_cross_entropy = False, False
    assert_close("nn.CrossEntropyLoss", model(ids, labels=ids).loss, ref.loss, 1e-5)
    assert isinstance(tiny_model(device)._default_criterion(), FusedCrossEntropyLoss)


def test_l2warp_changes_gradients_not_loss(device):
    ids = torch.randint(0, V, (2, 8), device=device)
    losses, grads = [], []
    for use_l2warp in (False, True):
        torch.manual_seed(0)
        model = tiny_model(device, use_l2warp=use_l2warp).train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.lm_head.weight.grad.clone())
    assert torch.equal(losses[0], losses[1])
    assert not torch.equal(grads[0], grads[1])


def test_logits_to_keep(device):
    model = tiny_model(device).eval()
    ids = torch.randint(0, V, (2, 9), device=device)
    full = model(ids).logits
    assert_close("last 3", model(ids, logits_to_keep=3).logits, full[:, -3:], 1e-6)
    assert_close("index", model(ids, logits_to_keep=torch.tensor([0, 4], device=device)).logits, full[:, [0, 4]], 1e-6)
    out = model(ids, labels=ids, logits_to_keep=1)
    assert out.logits.shape == (2, 1, V) and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------------------
# padding, packing, caching


def test_padded_batch_equals_packed_batch(device):
    model = tiny_model(device).eval()
    ids, mask = left_padded_batch([9, 4, 7], 9, device, V)
    mask[2] = 0
    mask[2, :7] = 1  # right padding too
    ids = ids.masked_fill(mask == 0, 0)
    check_padded_equals_packed(model, ids, mask, 1e-4)


def test_cached_decoding_with_left_padding_matches_full_forward(device):
    model = tiny_model(device).eval()
    check_cached_decoding(model, 12, 4, device, V, 1e-4)


def test_plain_forward_cache_continues(device):
    """lm-eval style: forward with use_cache=True, then feed the continuation with the returned cache."""
    model = tiny_model(device).eval()
    ids = torch.randint(1, V, (2, 11), device=device)
    full = model(ids).logits
    first = model(ids[:, :6], use_cache=True)
    second = model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    assert_close("continued", torch.cat([first.logits, second.logits], 1), full, 1e-5)
    assert model(ids, use_cache=False).past_key_values is None
    assert model(ids, return_dict=False)[0].shape == (2, 11, V)


# ---------------------------------------------------------------------------------------------------------------
# generate


def test_generate_greedy_with_left_padding(device):
    model = tiny_model(device).eval()
    ids, mask = left_padded_batch([6, 1] + torch.randint(1, 7, (2,)).tolist(), 6, device, V)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 11) and torch.equal(out[:, :6], ids)
    assert torch.equal(out[:, 6:], greedy_reference(model, ids, mask, 5))
    # without a cache too
    out_nc = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                            use_cache=False)
    assert torch.equal(out_nc, out)


def test_generate_sampling_and_beam_search(device):
    model = tiny_model(device).eval()
    ids, mask = left_padded_batch([5, 2], 5, device, V)
    torch.manual_seed(1)
    a = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=8, pad_token_id=0)
    torch.manual_seed(1)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=8, pad_token_id=0)
    assert a.shape == (2, 9) and torch.equal(a, b) and ((a >= 0) & (a < V)).all()
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (2, 8)


# ---------------------------------------------------------------------------------------------------------------
# save / load, options


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_pretrained_round_trip(device, tmp_path, tied):
    model = tiny_model(device, tie_word_embeddings=tied).eval()
    ids = torch.randint(1, V, (2, 7), device=device)
    ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).to(device).eval()
    assert isinstance(loaded, GatedDeltaNetForCausalLM)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert_close("logits", loaded(ids).logits, ref, 0)
    assert (loaded.lm_head.weight is loaded.model.embeddings.weight) == tied


def test_unfused_norm_and_gradient_checkpointing(device):
    model = tiny_model(device).train()
    ids = torch.randint(0, V, (2, 8), device=device)
    ref = model(ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    unfused = tiny_model(device, fuse_norm=False, fuse_swiglu=False).train()
    assert type(unfused.model.norm) is nn.RMSNorm
    unfused.load_state_dict(model.state_dict())
    assert_close("unfused", unfused(ids, labels=ids).loss, ref.loss, 1e-5)

    model.zero_grad()
    model.gradient_checkpointing_enable()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert_close("checkpointed loss", out.loss, ref.loss, 1e-6)
    for name, p in model.named_parameters():
        assert_close(f"checkpointed grad {name}", p.grad, ref_grads[name], 1e-5, atol=1e-8)


def test_tiny_model_learns_and_generates(device):
    torch.manual_seed(0)
    model = tiny_model(device, initializer_range=0.02).train()
    seq = torch.randint(3, V, (1, 16), device=device).repeat(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(seq, labels=seq).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.1 * losses[0], losses
    model.eval()
    out = model.generate(seq[:1, :8], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 16)
    # it has memorised the sequence
    assert (out[0, 8:] == seq[0, 8:]).float().mean() >= 0.75
