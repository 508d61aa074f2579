"""Transformer language model: every layer an ``Attention`` mixer + SwiGLU MLP (``fla.models.modeling_base``).

``TransformerModel`` (embeddings, layers, norm) and ``TransformerForCausalLM`` (+ lm_head, loss, generate).
Init as every family: N(0, initializer_range), no residual rescale unless ``prenorm_residual_strategy`` is set.
"""

from __future__ import annotations

from fla.layers.attn import Attention
from fla.models.modeling_base import FLABlock, FLAForCausalLM, FLAModel
from fla.models.transformer.configuration_transformer import TransformerConfig


class TransformerBlock(FLABlock):
    """``attn_norm`` -> ``attn`` (Attention) -> ``mlp_norm`` (fused residual add) -> ``mlp``."""

    def build_mixer(self, config: TransformerConfig, layer_idx: int) -> Attention:
        return Attention(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            qkv_bias=config.qkv_bias,
            qk_norm=config.qk_norm,
            window_size=config.window_size,
            rope_theta=config.rope_theta,
            max_position_embeddings=config.max_position_embeddings,
            layer_idx=layer_idx,
            norm_eps=config.norm_eps,
        )


class TransformerModel(FLAModel):
    config_class = TransformerConfig
    block_class = TransformerBlock
    _no_split_modules = ["TransformerBlock"]


class TransformerForCausalLM(FLAForCausalLM):
    config_class = TransformerConfig
    model_class = TransformerModel
    _no_split_modules = ["TransformerBlock"]
