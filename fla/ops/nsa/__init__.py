"""Native Sparse Attention: compressed (mean-pooled blocks) + top-k selected blocks + sliding window, gated."""

from fla.ops.nsa.cache import nsa_cache_append_one
from fla.ops.nsa.compression import append_compressed_blocks, mean_pool_blocks
from fla.ops.nsa.decoding import nsa_decoding_one_step
from fla.ops.nsa.naive import naive_nsa
from fla.ops.nsa.parallel import parallel_nsa

__all__ = [
    "append_compressed_blocks",
    "mean_pool_blocks",
    "naive_nsa",
    "nsa_cache_append_one",
    "nsa_decoding_one_step",
    "parallel_nsa",
]
