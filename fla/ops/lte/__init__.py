"""Learnable Token Eviction ops: window + selected-key attention (training / evaluation / prefill), the eviction
cache (ring of the last w + 1 tokens + a streaming top-b buffer) and one-step decoding over it."""

from fla.ops.lte.cache import lte_cache_prefill, lte_cache_step, lte_empty_cache
from fla.ops.lte.decoding import lte_decoding_one_step, naive_lte_decoding
from fla.ops.lte.naive import naive_lte_attn
from fla.ops.lte.parallel import parallel_lte_attn
from fla.ops.lte.router_step import lte_router_step, router_centre_logits, router_centre_scores, routing_activation
from fla.ops.lte.selection import enforce_buffer_size, select_tokens, sink_mask

__all__ = ["enforce_buffer_size", "lte_cache_prefill", "lte_cache_step", "lte_decoding_one_step", "lte_empty_cache",
           "naive_lte_attn", "naive_lte_decoding", "parallel_lte_attn",
           "lte_router_step", "router_centre_logits", "router_centre_scores", "routing_activation", "select_tokens",
           "sink_mask"]
