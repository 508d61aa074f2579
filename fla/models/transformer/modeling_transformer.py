"""Transformer language model: every layer an ``Attention`` mixer + SwiGLU MLP (``fla.models.modeling_base``).

``TransformerModel`` (embeddings, layers, norm) and ``TransformerForCausalLM`` (+ lm_head, loss, generate).
Init as every family: N(0, initializer_range), no residual rescale unless ``prenorm_residual_strategy`` is set.
"""

from __future__ import annotations

from fla.layers.attn import Attention
from fla.models.modeling_base import FLABlock, FLAForCausalLM, FLAModel, build_attention
from fla.models.transformer.configuration_transformer import TransformerConfig


class TransformerBlock(FLABlock):
    """``attn_norm`` -> ``attn`` (Attention) -> ``mlp_norm`` (fused residual add) -> ``mlp``."""

    def build_mixer(self, config: TransformerConfig, layer_idx: int) -> Attention:
        return build_attention(config, layer_idx)


class TransformerModel(FLAModel):
    config_class = TransformerConfig
    block_class = TransformerBlock
    _no_split_modules = ["TransformerBlock"]


class TransformerForCausalLM(FLAForCausalLM):
    config_class = TransformerConfig
    model_class = TransformerModel
    _no_split_modules = ["TransformerBlock"]
