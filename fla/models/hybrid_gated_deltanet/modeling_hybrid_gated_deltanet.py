"""Hybrid Gated DeltaNet language model (laLTE, laNSA, GDN + SWA / full attention in one class).

Every layer is a ``GatedDeltaNet`` mixer except those in ``config.attn['layers']``, whose mixer ``attn_type`` picks
(``LTEAttention``, ``NativeSparseAttention`` or ``Attention``), in the shared block (``fla.models.modeling_base``).

LTE extras:
- ``model.l1_lambda`` / ``model.num_kept``: the L1 controller's persistent buffers (``fla.models.lte_controller``;
  shapes by ``l1_lambda_shared``: [] 'all', [N_l] 'layer', [N_l, H_kv] 'head'; num_kept [N_l, H_kv]), zero at init.
- ``routing_shared='all'``: the LTE layers of one model share one convolution stack (never across models).
- outputs carry ``routing_stats``: one ``RoutingStats`` per LTE layer of a non-cached forward (for the regulariser).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from fla.layers.lte import LTEAttention
from fla.layers.lte_router import LTERouter, init_router_conv
from fla.models.gated_deltanet.modeling_gated_deltanet import GatedDeltaNetBlock
from fla.models.hybrid_gated_deltanet.configuration_hybrid_gated_deltanet import HybridGatedDeltaNetConfig
from fla.models.lte_controller import lte_buffers
from fla.models.modeling_base import FLAForCausalLM, FLAModel, build_attention


def build_lte(config, layer_idx: int, spec: dict) -> LTEAttention:
    """An ``LTEAttention`` mixer for layer ``layer_idx`` from a hybrid's ``attn`` dict (head size = hidden_size //
    num_heads, as the reference). With ``routing_shared='all'`` it gets its own stack here; the model ties them."""
    shared = spec["routing_shared"]
    stack = None
    if shared == "all":
        stack = LTERouter.build_shared_stack(config.hidden_size // spec["num_heads"], spec["conv_size"],
                                             spec["conv_dilation"], spec["dropout_prob"])
    return LTEAttention(
        hidden_size=config.hidden_size,
        num_heads=spec["num_heads"],
        num_kv_heads=spec["num_kv_heads"],
        window_size=spec["window_size"],
        rope_theta=spec.get("rope_theta", 10000.0),
        max_position_embeddings=config.max_position_embeddings,
        qkv_bias=spec.get("qkv_bias", False),
        conv_size=spec["conv_size"],
        conv_dilation=spec["conv_dilation"],
        dropout_prob=spec["dropout_prob"],
        buffer_size=spec["buffer_size"],
        sink_size=spec["sink_size"],
        routing_method=spec["routing_method"],
        routing_grad=spec["routing_grad"],
        routing_shared=shared,
        shared_stack=stack,
        layer_idx=layer_idx,
    )


class HybridGatedDeltaNetBlock(GatedDeltaNetBlock):
    """The Gated DeltaNet block whose attention layers may be LTE or NSA mixers."""

    def build_mixer(self, config: HybridGatedDeltaNetConfig, layer_idx: int) -> nn.Module:
        attn = config.attn
        if attn is not None and layer_idx in attn["layers"]:
            if attn["attn_type"] == "lte":
                return build_lte(config, layer_idx, attn)
            if attn["attn_type"] == "nsa":
                from fla.models.nsa.modeling_nsa import build_nsa

                return build_nsa(config, layer_idx, attn)
            return build_attention(config, layer_idx, spec=attn)
        return super().build_mixer(config, layer_idx)


class _LTEInit:
    """``_init_weights`` plus what the shared one cannot know: the router convolutions' own init (transformers visits
    the Conv2d modules, not the stack that holds them) and the controller buffers (zero), unless a loader filled
    them. Mixed into both the backbone and the causal LM (each runs its own ``post_init``)."""

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d) and hasattr(module, "lte_projection"):
            if not all(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                init_router_conv(module)
        elif isinstance(module, HybridGatedDeltaNetModel) and hasattr(module, "l1_lambda"):
            for buf in (module.l1_lambda, module.num_kept):
                if not getattr(buf, "_is_hf_initialized", False):
                    buf.zero_()


class HybridGatedDeltaNetModel(_LTEInit, FLAModel):
    config_class = HybridGatedDeltaNetConfig
    block_class = HybridGatedDeltaNetBlock
    _no_split_modules = ["HybridGatedDeltaNetBlock"]

    def __init__(self, config: HybridGatedDeltaNetConfig) -> None:
        super().__init__(config)
        attn = config.attn
        if attn is None or attn["attn_type"] != "lte":
            return
        # the reference has these buffers only in LTE models
        l1_lambda, num_kept = lte_buffers(len(attn["layers"]), attn["num_kv_heads"],
                                          attn.get("l1_lambda_shared", "head"), device=self.embeddings.weight.device)
        self.register_buffer("l1_lambda", l1_lambda, persistent=True)
        self.register_buffer("num_kept", num_kept, persistent=True)
        if attn["routing_shared"] == "all":
            routers = [layer.attn.router for layer in self.layers if isinstance(layer.attn, LTEAttention)]
            for router in routers[1:]:
                router.conv_stack = routers[0].conv_stack


class HybridGatedDeltaNetForCausalLM(_LTEInit, FLAForCausalLM):
    config_class = HybridGatedDeltaNetConfig
    model_class = HybridGatedDeltaNetModel
    _no_split_modules = ["HybridGatedDeltaNetBlock"]

    def lte_controller(self, seq_len: int, process_group: Optional[object] = None):
        """An ``LTESparsityController`` for this model's LTE layers (the trainer drives it)."""
        from fla.models.lte_controller import LTESparsityController

        return LTESparsityController(self, self.config.attn, seq_len, process_group=process_group)
