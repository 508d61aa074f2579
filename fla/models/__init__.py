"""HF-compatible model families (Config / Model / ForCausalLM), registered with transformers' Auto classes on import.

Shared pieces: ``fla.models.utils`` (the ``Cache`` of every family, ``FLAGenerationMixin``) and
``fla.models.modeling_base`` (block, pretrained-model base, backbone, causal LM head). ``fla.models.graph_decode``:
``GraphDecoder``, decode steps replayed as one CUDA graph, and ``graph_generate``.
"""

from fla.models.gated_deltanet import GatedDeltaNetConfig, GatedDeltaNetForCausalLM, GatedDeltaNetModel
from fla.models.graph_decode import GraphDecoder, graph_generate
from fla.models.hybrid_gated_deltanet import (
    HybridGatedDeltaNetConfig,
    HybridGatedDeltaNetForCausalLM,
    HybridGatedDeltaNetModel,
)
from fla.models.nsa import NSAConfig, NSAForCausalLM, NSAModel
from fla.models.transformer import TransformerConfig, TransformerForCausalLM, TransformerModel
from fla.models.utils import Cache, FLAGenerationMixin

__all__ = [
    "Cache",
    "FLAGenerationMixin",
    "GatedDeltaNetConfig",
    "GatedDeltaNetForCausalLM",
    "GatedDeltaNetModel",
    "GraphDecoder",
    "HybridGatedDeltaNetConfig",
    "HybridGatedDeltaNetForCausalLM",
    "HybridGatedDeltaNetModel",
    "NSAConfig",
    "NSAForCausalLM",
    "NSAModel",
    "TransformerConfig",
    "TransformerForCausalLM",
    "TransformerModel",
    "graph_generate",
]
