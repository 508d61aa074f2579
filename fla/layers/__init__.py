"""Token mixers: ``forward(hidden_states, attention_mask=None, past_key_values=None, use_cache=False,
output_attentions=False, **kwargs) -> (output, attention weights or None, past_key_values)``.

``attention_mask`` is a 2-D [batch, time] 0/1 padding mask; ``cu_seqlens`` (packed sequences, batch 1) arrives
through ``kwargs``; the per-layer state lives in an ``fla.models.utils.Cache`` at the layer's ``layer_idx``.
"""

from fla.layers.attn import Attention
from fla.layers.gated_deltanet import GatedDeltaNet
from fla.layers.lte import LTEAttention
from fla.layers.nsa import NativeSparseAttention

__all__ = ["Attention", "GatedDeltaNet", "LTEAttention", "NativeSparseAttention"]
