"""Gated DeltaNet language model: every layer a ``GatedDeltaNet`` mixer + SwiGLU MLP (``fla.models.modeling_base``).

``GatedDeltaNetModel`` (embeddings, layers, norm) and ``GatedDeltaNetForCausalLM`` (+ lm_head, loss, generate).
With an ``attn`` dict in the config (the paper's SWA and full-attention baselines), the layers listed in
``attn['layers']`` get an ``Attention`` mixer instead (head size hidden_size // attn['num_heads']; ``window_size``
set = sliding window), in the same block class.
"""

from __future__ import annotations

from typing import Union

from fla.layers.attn import Attention
from fla.layers.gated_deltanet import GatedDeltaNet
from fla.models.gated_deltanet.configuration_gated_deltanet import GatedDeltaNetConfig
from fla.models.modeling_base import FLABlock, FLAForCausalLM, FLAModel, build_attention


class GatedDeltaNetBlock(FLABlock):
    """``attn_norm`` -> ``attn`` (GatedDeltaNet, or Attention at ``config.attn['layers']``) -> ``mlp_norm`` (fused
    residual add) -> ``mlp``."""

    def build_mixer(self, config: GatedDeltaNetConfig, layer_idx: int) -> Union[GatedDeltaNet, Attention]:
        attn = getattr(config, "attn", None)
        if attn is not None and layer_idx in attn["layers"]:
            return build_attention(config, layer_idx, spec=attn)
        return GatedDeltaNet(
            hidden_size=config.hidden_size,
            expand_v=config.expand_v,
            head_dim=config.head_dim,
            num_heads=config.num_heads,
            num_v_heads=config.num_v_heads,
            mode=config.attn_mode,
            use_gate=config.use_gate,
            use_short_conv=config.use_short_conv,
            allow_neg_eigval=config.allow_neg_eigval,
            conv_size=config.conv_size,
            layer_idx=layer_idx,
            norm_eps=config.norm_eps,
        )


class GatedDeltaNetModel(FLAModel):
    config_class = GatedDeltaNetConfig
    block_class = GatedDeltaNetBlock
    _no_split_modules = ["GatedDeltaNetBlock"]


class GatedDeltaNetForCausalLM(FLAForCausalLM):
    config_class = GatedDeltaNetConfig
    model_class = GatedDeltaNetModel
    _no_split_modules = ["GatedDeltaNetBlock"]
