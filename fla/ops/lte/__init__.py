"""Learnable Token Eviction: window + selected-key attention (training / evaluation), cache and decoding ops."""

from fla.ops.lte.naive import naive_lte_attn
from fla.ops.lte.selection import enforce_buffer_size, select_tokens

__all__ = ["enforce_buffer_size", "naive_lte_attn", "select_tokens"]
