"""Index helpers for packed (varlen) sequences described by FlashAttention-style ``cu_seqlens``.

``cu_seqlens`` is an integer vector [N + 1] of offsets into the packed time axis: sequence n occupies tokens
``cu_seqlens[n]:cu_seqlens[n + 1]``, with ``cu_seqlens[0] = 0`` and ``cu_seqlens[-1] = T``. All helpers are
vectorised (no Python loop over sequences) and return tensors on the device of their input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepare_lens(cu_seqlens: torch.LongTensor) -> torch.LongTensor:
    """Lengths [N] of the sequences."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def prepare_lens_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Lengths [B] (int32) of the valid tokens in a 0/1 padding mask [B, T]."""
    return mask.sum(-1, dtype=torch.int32)


def prepare_cu_seqlens_from_lens(lens: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Offsets [N + 1] from lengths [N]."""
    return F.pad(lens.cumsum(0, dtype=dtype), (1, 0))


def prepare_cu_seqlens_from_mask(mask: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Offsets [B + 1] of the valid tokens of each row of a 0/1 padding mask [B, T], as if they were packed."""
    return prepare_cu_seqlens_from_lens(prepare_lens_from_mask(mask), dtype)


def prepare_position_ids(cu_seqlens: torch.LongTensor) -> torch.LongTensor:
    """Position [T] of each packed token inside its own sequence (0 at every sequence start)."""
    lens = prepare_lens(cu_seqlens)
    total = int(cu_seqlens[-1])
    starts = torch.repeat_interleave(cu_seqlens[:-1], lens, output_size=total)
    return torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype) - starts


def prepare_sequence_ids(cu_seqlens: torch.LongTensor) -> torch.LongTensor:
    """Index [T] of the sequence each packed token belongs to (empty sequences are skipped correctly)."""
    lens = prepare_lens(cu_seqlens)
    ids = torch.arange(lens.numel(), device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.repeat_interleave(ids, lens, output_size=int(cu_seqlens[-1]))


def prepare_token_indices(cu_seqlens: torch.LongTensor) -> torch.LongTensor:
    """[T, 2]: (sequence index, position inside the sequence) of each packed token."""
    return torch.stack([prepare_sequence_ids(cu_seqlens), prepare_position_ids(cu_seqlens)], 1)


def prepare_chunk_offsets(cu_seqlens: torch.LongTensor, chunk_size: int) -> torch.LongTensor:
    """[N + 1]: offsets of each sequence's first chunk when every sequence is split into chunks of ``chunk_size``."""
    return F.pad(_cdiv(prepare_lens(cu_seqlens), chunk_size), (1, 0)).cumsum(-1)


def prepare_chunk_indices(cu_seqlens: torch.LongTensor, chunk_size: int) -> torch.LongTensor:
    """[num_chunks, 2]: (sequence index, chunk index inside the sequence) of every chunk of every sequence."""
    chunks = _cdiv(prepare_lens(cu_seqlens), chunk_size)
    offsets = F.pad(chunks, (1, 0)).cumsum(-1)
    return prepare_token_indices(offsets)


def prepare_cu_seqlens_from_position_ids(position_ids: torch.LongTensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Offsets [N + 1] of the packed sequences in ``position_ids`` [T] (or [1, T]): a new sequence starts at every 0."""
    position_ids = position_ids.reshape(-1)
    starts = torch.nonzero(position_ids == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = F.pad(starts, (1, 0))
    total = torch.tensor([position_ids.numel()], device=position_ids.device, dtype=starts.dtype)
    return torch.cat([starts, total]).to(dtype)


def _cdiv(x: torch.Tensor, y: int) -> torch.Tensor:
    """Ceiling division of an integer tensor by a positive int."""
    return (x + y - 1) // y
