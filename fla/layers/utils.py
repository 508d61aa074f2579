"""Padding helpers for token mixers: a [B, T] 0/1 padding mask <-> packed sequences described by ``cu_seqlens``.

A padded batch [B, T, ...] with mask [B, T] (1 = real token, 0 = padding, anywhere in the row) becomes one packed
row [1, total, ...] of its real tokens, row after row, plus FlashAttention-style offsets ``cu_seqlens`` [B + 1]
(sequence b is packed tokens ``cu_seqlens[b]:cu_seqlens[b + 1]``). Every sequence of the batch keeps its slot, also
when it has no real token, so recurrent states stay indexed by the batch row: state n belongs to row n.

    packed, indices, cu_seqlens, max_seqlen = unpad_input(x, mask)    # [B, T, ...] -> [1, total, ...]
    y = pad_input(f(packed, cu_seqlens), indices, B, T)                # back to [B, T, ...], zeros at the pads
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fla.ops.utils.index import prepare_cu_seqlens_from_lens, prepare_lens_from_mask

MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_mixer_inputs(hidden_states, hidden_size: int, past_key_values, layer_idx) -> None:
    """The checks every token mixer's ``forward`` starts with: ``hidden_states`` is [batch, time, hidden_size], and
    a cache can only be used by a layer that knows its slot (``layer_idx``)."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 3 or hidden_states.shape[-1] != hidden_size:
        shape = list(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
        raise ValueError(f"hidden_states must be [batch, time, hidden_size={hidden_size}], got {shape}")
    if past_key_values is not None and layer_idx is None:
        raise ValueError("layer_idx must be set (the layer's slot in the cache) to use past_key_values")


def check_padding_mask(attention_mask: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """Validate a [B, T'] 0/1 padding mask (T' >= seq_len) and return its last ``seq_len`` columns.

    The mask of a cached forward covers the past tokens too ([B, past + T], as ``generate`` passes it): only the
    columns of the current tokens matter to a layer that keeps its past in a recurrent state.
    """
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a [batch, time] 0/1 tensor, got {type(attention_mask).__name__}")
    if attention_mask.ndim != 2:
        raise ValueError(
            f"attention_mask must be a 2-D [batch, time] padding mask (1 = token, 0 = padding), got shape "
            f"{list(attention_mask.shape)}; 4-D attention masks are not supported"
        )
    if attention_mask.dtype not in MASK_DTYPES:
        raise ValueError(f"attention_mask has dtype {attention_mask.dtype}; use bool or an integer / float 0/1 tensor")
    if attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
        raise ValueError(
            f"attention_mask has shape {list(attention_mask.shape)}, expected [{batch_size}, >= {seq_len}] for inputs "
            f"of batch size {batch_size} and {seq_len} tokens"
        )
    return attention_mask[:, attention_mask.shape[1] - seq_len:]


def padding_mask(attention_mask: Optional[torch.Tensor], batch_size: int, seq_len: int,
                 cu_seqlens: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """What a token mixer does with its ``attention_mask``: the checked last ``seq_len`` columns
    (``check_padding_mask``), or None when there is no mask or no padding. A padding mask together with
    ``cu_seqlens`` is an error (the two describe different layouts)."""
    if attention_mask is None:
        return None
    mask = check_padding_mask(attention_mask, batch_size, seq_len)
    if bool((mask != 0).all()):
        return None
    if cu_seqlens is not None:
        raise ValueError("got both a padding attention_mask and cu_seqlens: pass one of them (cu_seqlens describes "
                         "sequences packed into one row; a padding mask describes padded rows)")
    return mask


def _check_zero_one(attention_mask: torch.Tensor) -> None:
    if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError(
            "attention_mask must hold only 0 (padding) and 1 (token); got other values (an additive mask of "
            "0 / -inf is not a padding mask)"
        )


def get_unpad_data(attention_mask: torch.Tensor) -> Tuple[torch.LongTensor, torch.Tensor, int]:
    """From a [B, T] 0/1 padding mask: (indices [total] int64 of the real tokens in the flattened [B * T] layout,
    cu_seqlens [B + 1] int32, the longest sequence length as a Python int)."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, time], got shape {list(attention_mask.shape)}")
    _check_zero_one(attention_mask)
    lens = prepare_lens_from_mask(attention_mask != 0)
    indices = torch.nonzero(attention_mask.reshape(-1) != 0).flatten()
    cu_seqlens = prepare_cu_seqlens_from_lens(lens, torch.int32)
    max_seqlen = int(lens.max()) if lens.numel() > 0 else 0
    return indices, cu_seqlens, max_seqlen


def index_first_axis(x: torch.Tensor, indices: torch.LongTensor) -> torch.Tensor:
    """``x[indices]`` along the first axis (differentiable: the gradient is an index_add, not an index_put)."""
    return torch.index_select(x, 0, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.LongTensor, first_axis_dim: int) -> torch.Tensor:
    """A zero tensor [first_axis_dim, ...] with ``values`` [len(indices), ...] written at ``indices``
    (differentiable)."""
    out = values.new_zeros((first_axis_dim,) + tuple(values.shape[1:]))
    return out.index_copy(0, indices, values)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.LongTensor, torch.Tensor, int]:
    """Pack the real tokens of ``hidden_states`` [B, T, ...] selected by the 0/1 mask [B, T].

    Returns:
        (packed [1, total, ...], indices [total] into the flattened [B * T] layout, cu_seqlens [B + 1] int32,
        max_seqlen int).
    """
    B, T = hidden_states.shape[:2]
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must have shape [{B}, {T}] like hidden_states' first two dimensions, "
                         f"got {list(attention_mask.shape)}")
    indices, cu_seqlens, max_seqlen = get_unpad_data(attention_mask)
    flat = hidden_states.reshape((B * T,) + tuple(hidden_states.shape[2:]))
    return index_first_axis(flat, indices).unsqueeze(0), indices, cu_seqlens, max_seqlen


def pad_input(hidden_states: torch.Tensor, indices: torch.LongTensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """Inverse of ``unpad_input``: packed [1, total, ...] (or [total, ...]) -> [batch_size, seq_len, ...], zeros at
    the padded positions."""
    if hidden_states.ndim >= 2 and hidden_states.shape[0] == 1 and hidden_states.shape[1] == indices.numel():
        hidden_states = hidden_states.squeeze(0)
    if hidden_states.shape[0] != indices.numel():
        raise ValueError(f"hidden_states holds {hidden_states.shape[0]} tokens but indices {indices.numel()}")
    out = index_put_first_axis(hidden_states, indices, batch_size * seq_len)
    return out.reshape((batch_size, seq_len) + tuple(hidden_states.shape[1:]))


def left_aligned_mask(lens: torch.Tensor, width: int) -> torch.Tensor:
    """[N, width] bool: row n is True in its last lens[n] columns."""
    cols = torch.arange(width, device=lens.device)
    return cols[None, :] >= (width - lens)[:, None]


def left_align(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter packed tokens [total, ...] (row after row, in order) into [N, W, ...] where ``mask`` [N, W] is True;
    zeros elsewhere."""
    out = packed.new_zeros(tuple(mask.shape) + tuple(packed.shape[1:]))
    out[mask] = packed
    return out


def last_steps(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` time steps of ``x`` [N, T, ...] as a tensor that owns its memory ([N, min(n, T), ...]).

    For caches: a slice ``x[:, -n:]`` is a view that keeps the whole of ``x`` (a prompt's keys, say) alive, so a
    bounded cache would hold memory that grows with the prompt. ``x`` itself is returned when nothing is dropped.
    """
    if x.shape[1] <= n:
        return x
    return x[:, x.shape[1] - n:].clone()
