"""Causal softmax attention: full and sliding window, grouped-query, packed sequences; one-step decoding."""

from fla.ops.attn.decoding import attn_decoding_one_step
from fla.ops.attn.naive import naive_attn, naive_attn_decoding
from fla.ops.attn.parallel import parallel_attn

__all__ = ["attn_decoding_one_step", "naive_attn", "naive_attn_decoding", "parallel_attn"]
