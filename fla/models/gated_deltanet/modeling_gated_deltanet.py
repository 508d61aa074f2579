"""Gated DeltaNet language model: every layer a ``GatedDeltaNet`` mixer + SwiGLU MLP (``fla.models.modeling_base``).

``GatedDeltaNetModel`` (embeddings, layers, norm) and ``GatedDeltaNetForCausalLM`` (+ lm_head, loss, generate).
Configs with an ``attn`` dict (the paper's SWA and full-attention baselines) are refused until the attention layer
exists.
"""

from __future__ import annotations

from fla.layers.gated_deltanet import GatedDeltaNet
from fla.models.gated_deltanet.configuration_gated_deltanet import GatedDeltaNetConfig
from fla.models.modeling_base import FLABlock, FLAForCausalLM, FLAModel


class GatedDeltaNetBlock(FLABlock):
    """``attn_norm`` -> ``attn`` (GatedDeltaNet) -> ``mlp_norm`` (fused residual add) -> ``mlp``."""

    def build_mixer(self, config: GatedDeltaNetConfig, layer_idx: int) -> GatedDeltaNet:
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

    def __init__(self, config: GatedDeltaNetConfig) -> None:
        if getattr(config, "attn", None) is not None:
            raise ValueError(
                f"this config places attention layers at {config.attn.get('layers')} (config.attn): hybrid "
                "attention layers arrive with the attention layer (fla.layers.attn), which does not exist yet; "
                "use attn=None for a pure Gated DeltaNet model"
            )
        super().__init__(config)


class GatedDeltaNetForCausalLM(FLAForCausalLM):
    config_class = GatedDeltaNetConfig
    model_class = GatedDeltaNetModel
    _no_split_modules = ["GatedDeltaNetBlock"]
