"""NSA language model: every layer a ``NativeSparseAttention`` mixer + SwiGLU MLP (``fla.models.modeling_base``).

``NSAModel`` (embeddings, layers, norm) and ``NSAForCausalLM`` (+ lm_head, loss, generate). Init as every family:
N(0, initializer_range), no residual rescale unless ``prenorm_residual_strategy`` is set.
"""

from __future__ import annotations

from fla.layers.nsa import NativeSparseAttention
from fla.models.modeling_base import FLABlock, FLAForCausalLM, FLAModel
from fla.models.nsa.configuration_nsa import NSAConfig


def build_nsa(config, layer_idx: int, spec=None) -> NativeSparseAttention:
    """A ``NativeSparseAttention`` mixer for layer ``layer_idx``: head layout, blocks, window and RoPE base from
    ``spec`` (a hybrid's ``attn`` dict) or, without one, from the config's own fields; hidden size and
    ``max_position_embeddings`` always from the config."""

    def field(name, default=None):
        return spec.get(name, default) if spec is not None else getattr(config, name, default)

    return NativeSparseAttention(
        hidden_size=config.hidden_size,
        num_heads=field("num_heads"),
        num_kv_heads=field("num_kv_heads"),
        head_dim=field("head_dim", 64),
        qkv_bias=field("qkv_bias", False),
        block_size=field("block_size", 64),
        block_counts=field("block_counts", 16),
        window_size=field("window_size", 512),
        rope_theta=field("rope_theta", 10000.0),
        max_position_embeddings=config.max_position_embeddings,
        layer_idx=layer_idx,
    )


class NSABlock(FLABlock):
    """``attn_norm`` -> ``attn`` (NativeSparseAttention) -> ``mlp_norm`` (fused residual add) -> ``mlp``."""

    def build_mixer(self, config: NSAConfig, layer_idx: int) -> NativeSparseAttention:
        return build_nsa(config, layer_idx)


class NSAModel(FLAModel):
    config_class = NSAConfig
    block_class = NSABlock
    _no_split_modules = ["NSABlock"]


class NSAForCausalLM(FLAForCausalLM):
    config_class = NSAConfig
    model_class = NSAModel
    _no_split_modules = ["NSABlock"]
