"""Helpers shared by the ops: cu_seqlens / position-id index helpers, L2 normalisation."""

from fla.ops.utils.index import (
    prepare_chunk_indices,
    prepare_chunk_offsets,
    prepare_cu_seqlens_from_lens,
    prepare_cu_seqlens_from_mask,
    prepare_cu_seqlens_from_position_ids,
    prepare_lens,
    prepare_lens_from_mask,
    prepare_position_ids,
    prepare_sequence_ids,
    prepare_token_indices,
)
from fla.ops.utils.l2norm import l2_norm, l2norm, l2norm_bwd, l2norm_fwd

__all__ = [
    "l2_norm",
    "l2norm",
    "l2norm_bwd",
    "l2norm_fwd",
    "prepare_chunk_indices",
    "prepare_chunk_offsets",
    "prepare_cu_seqlens_from_lens",
    "prepare_cu_seqlens_from_mask",
    "prepare_cu_seqlens_from_position_ids",
    "prepare_lens",
    "prepare_lens_from_mask",
    "prepare_position_ids",
    "prepare_sequence_ids",
    "prepare_token_indices",
]
