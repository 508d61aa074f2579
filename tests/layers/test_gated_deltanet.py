"""GatedDeltaNet layer: padding == packing == per-sequence runs, cached decoding == one pass, dtypes, init, errors.

The gated delta rule ops are exercised through the layer only (their numerics are tested in tests/ops); sizes are
tiny because the ops may still run their token-by-token reference on the CPU.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fla.ops.gated_delta_rule as gdr_ops
from fla.layers import GatedDeltaNet
from fla.layers.utils import get_unpad_data, pad_input, unpad_input
from fla.models.utils import Cache
from fla.utils.testing import assert_close

H = 32


def make_layer(device, **kwargs):
    options = dict(hidden_size=H, head_dim=8, num_heads=4, expand_v=1, layer_idx=0)
    options.update(kwargs)
    return GatedDeltaNet(**options).to(device)


def padding_mask(lens, T, left, device):
    mask = torch.zeros(len(lens), T, dtype=torch.long, device=device)
    for b, n in enumerate(lens):
        if left:
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    return mask


def spy_ops(monkeypatch):
    """Record which gated-delta-rule op the layer calls and with which dtypes."""
    calls = []
    for name in ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"):
        original = getattr(gdr_ops, name)

        def spy(q, k, v, g, beta, *args, _name=name, _original=original, **kwargs):
            calls.append(dict(op=_name, q=q.dtype, v=v.dtype, g=g.dtype, beta=beta.detach().clone(), **kwargs))
            return _original(q, k, v, g, beta, *args, **kwargs)

        monkeypatch.setattr(gdr_ops, name, spy)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# padding utilities


def test_unpad_pad_round_trip(device):
    lens = [5, 0, 3]
    mask = padding_mask(lens, 6, left=True, device=device)
    x = torch.randn(3, 6, 4, device=device)
    packed, indices, cu_seqlens, max_seqlen = unpad_input(x, mask)
    assert packed.shape == (1, 8, 4)
    assert cu_seqlens.tolist() == [0, 5, 5, 8] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 5
    assert torch.equal(packed[0, :5], x[0, 1:])
    y = pad_input(packed, indices, 3, 6)
    assert torch.equal(y, x * mask[..., None])
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        get_unpad_data(torch.tensor([[0.0, float("-inf")]], device=device))


# ---------------------------------------------------------------------------------------------------------------
# padding / packing / per-sequence equivalence


@pytest.mark.parametrize("training", [False, True], ids=["eval-recurrent", "train-chunk"])
@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
def test_padded_equals_packed_equals_per_sequence(device, training, left):
    layer = make_layer(device).train(training)
    lens, T = [7, 12, 3], 12
    seqs = [torch.randn(1, n, H, device=device) for n in lens]
    mask = padding_mask(lens, T, left, device)
    x = torch.zeros(len(lens), T, H, device=device)
    x[mask.bool()] = torch.cat(seqs, 1)[0]
    x = x + 5.0 * (1 - mask[..., None])  # garbage at the pads: it must not leak anywhere

    per_seq = [layer(s)[0] for s in seqs]
    padded = layer(x, attention_mask=mask)[0]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=device)
    packed = layer(torch.cat(seqs, 1), cu_seqlens=cu)[0]

    ref = torch.cat(per_seq, 1)
    assert_close("padded", padded[mask.bool()][None], ref, 1e-5)
    assert_close("packed", packed, ref, 1e-5)
    assert torch.all(padded[~mask.bool()] == 0)

    # the gradients agree too (padding contributes nothing)
    grads = []
    for out in (padded[mask.bool()], packed[0]):
        layer.zero_grad()
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    for name in grads[0]:
        assert_close(f"grad {name}", grads[0][name], grads[1][name], 1e-5, atol=1e-7)


def test_final_states_padded_match_per_sequence(device):
    layer = make_layer(device).eval()
    lens, T = [6, 2], 6
    seqs = [torch.randn(1, n, H, device=device) for n in lens]
    mask = padding_mask(lens, T, left=True, device=device)
    x = torch.zeros(2, T, H, device=device)
    x[mask.bool()] = torch.cat(seqs, 1)[0]
    cache = Cache()
    layer(x, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length(0) == T
    for b, s in enumerate(seqs):
        ref = Cache()
        layer(s, past_key_values=ref, use_cache=True)
        assert_close("recurrent", cache[0]["recurrent_state"][b], ref[0]["recurrent_state"][0], 1e-5)
        for c, r in zip(cache[0]["conv_state"], ref[0]["conv_state"], strict=True):
            assert_close("conv", c[b], r[0], 1e-6)
    assert cache[0]["recurrent_state"].dtype == torch.float32
    assert cache[0]["recurrent_state"].shape == (2, 4, 8, 8)
    assert all(c.shape == (2, 32, 4) for c in cache[0]["conv_state"])


# ---------------------------------------------------------------------------------------------------------------
# cached decoding


@pytest.mark.parametrize("options", [dict(), dict(use_short_conv=False, use_gate=False), dict(expand_v=2)],
                         ids=["default", "no-conv-no-gate", "expand_v2"])
def test_decoding_with_cache_matches_full_forward(device, options):
    layer = make_layer(device, **options).eval()
    B, T, prefill = 2, 14, 5
    x = torch.randn(B, T, H, device=device)
    full = layer(x)[0]
    cache = Cache()
    outs = [layer(x[:, :prefill], past_key_values=cache, use_cache=True)[0]]
    for t in range(prefill, T):
        out, _, returned = layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)
        assert returned is cache
        outs.append(out)
    assert cache.get_seq_length(0) == T
    assert_close("decode", torch.cat(outs, 1), full, 1e-5)


def test_decoding_with_left_padding_matches_per_sequence(device):
    layer = make_layer(device).eval()
    lens, T, prefill = [9, 4, 1], 9, 3  # the last two rows have no real token in the prefill chunk
    mask = padding_mask(lens, T, left=True, device=device)
    x = torch.randn(3, T, H, device=device)
    cache = Cache()
    outs = [layer(x[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache, use_cache=True)[0]]
    for t in range(prefill, T):
        outs.append(layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)[0])
    out = torch.cat(outs, 1)
    for b, n in enumerate(lens):
        ref = layer(x[b:b + 1, T - n:])[0]
        assert_close(f"row {b}", out[b:b + 1, T - n:], ref, 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# op choice and dtypes


def test_mode_choice_and_dtypes(device, monkeypatch):
    calls = spy_ops(monkeypatch)
    layer = make_layer(device)
    x = torch.randn(1, 8, H, device=device)
    layer.eval()(x)
    layer.train()(x)
    layer.eval()(torch.randn(1, 65, H, device=device))
    assert [c["op"] for c in calls] == ["fused_recurrent_gated_delta_rule", "chunk_gated_delta_rule",
                                        "chunk_gated_delta_rule"]
    for c in calls:  # float32 in, float32 through: no silent cast to float16
        assert c["q"] == torch.float32 and c["v"] == torch.float32 and c["g"] == torch.float32
        assert c["use_qk_l2norm_in_kernel"] is True


def test_bfloat16_runs_in_bfloat16(device, monkeypatch):
    calls = spy_ops(monkeypatch)
    layer = make_layer(device).to(torch.bfloat16).eval()
    y = layer(torch.randn(2, 5, H, device=device, dtype=torch.bfloat16))[0]
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert calls[0]["q"] == torch.bfloat16 and calls[0]["g"] == torch.float32


def test_allow_neg_eigval_doubles_beta(device, monkeypatch):
    calls = spy_ops(monkeypatch)
    layer = make_layer(device, allow_neg_eigval=True).eval()
    x = torch.randn(1, 6, H, device=device)
    layer(x)
    assert_close("beta", calls[0]["beta"][0], 2 * torch.sigmoid(layer.b_proj(x))[0], 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# parameters, init, errors


def test_parameter_names_and_shapes(device):
    layer = make_layer(device, expand_v=2)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "A_log": (4,), "dt_bias": (4,),
        "q_proj.weight": (32, H), "k_proj.weight": (32, H), "v_proj.weight": (64, H),
        "a_proj.weight": (4, H), "b_proj.weight": (4, H),
        "q_conv1d.weight": (32, 1, 4), "k_conv1d.weight": (32, 1, 4), "v_conv1d.weight": (64, 1, 4),
        "g_proj.weight": (64, H), "o_norm.weight": (16,), "o_proj.weight": (H, 64),
    }
    plain = make_layer(device, use_gate=False, use_short_conv=False)
    assert not hasattr(plain, "g_proj") and not hasattr(plain, "q_conv1d")
    assert type(plain.o_norm).__name__ == "RMSNorm"


def check_decay_init(layer):
    A = layer.A_log.detach().exp()
    assert torch.isfinite(layer.A_log).all() and (A > 0).all() and (A <= 16 * (1 + 1e-6)).all()
    dt = F.softplus(layer.dt_bias.detach().float())
    assert ((dt >= 1e-3 * (1 - 1e-4)) & (dt <= 0.1 * (1 + 1e-4))).all()
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay


def test_decay_init_ranges_and_meta_device(device):
    layer = make_layer(device, num_heads=64, head_dim=2)
    check_decay_init(layer)
    # A spread over (0, 16]: mean of U(0, 16) is 8
    assert 5 < layer.A_log.detach().exp().mean().item() < 11
    with torch.device("meta"):
        meta = make_layer(None, num_heads=64, head_dim=2)
    meta = meta.to_empty(device=device)
    meta.reset_parameters()
    check_decay_init(meta)


def test_invalid_arguments(device):
    with pytest.raises(ValueError, match="num_v_heads"):
        make_layer(device, num_v_heads=8)
    with pytest.raises(ValueError, match="integer"):
        make_layer(device, expand_v=1.3)
    with pytest.raises(ValueError, match="mode"):
        make_layer(device, mode="parallel")
    layer = make_layer(device, mode="fused_recurrent").train()
    with pytest.raises(ValueError, match="no backward"):
        layer(torch.randn(1, 4, H, device=device))
    layer = make_layer(device)
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(1, 4, H + 1, device=device))
    with pytest.raises(ValueError, match="2-D"):
        layer(torch.randn(1, 4, H, device=device), attention_mask=torch.ones(1, 1, 4, 4, device=device))
    with pytest.raises(ValueError, match="layer_idx"):
        make_layer(device, layer_idx=None)(torch.randn(1, 4, H, device=device), past_key_values=Cache())


def test_mask_with_cu_seqlens(device):
    layer = make_layer(device).eval()
    x = torch.randn(1, 6, H, device=device)
    cu = torch.tensor([0, 2, 6], device=device)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]], device=device), cu_seqlens=cu)
    # an all-ones mask carries no padding: it is consistent with any packing
    ones = layer(x, attention_mask=torch.ones(1, 6, dtype=torch.long, device=device), cu_seqlens=cu)[0]
    assert_close("all-ones mask", ones, layer(x, cu_seqlens=cu)[0], 0)
    assert math.isfinite(ones.sum().item())
