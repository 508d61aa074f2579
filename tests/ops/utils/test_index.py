"""cu_seqlens index helpers against per-sequence Python loops."""

import pytest
import torch

from fla.ops.utils import (
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

LENS = [[5], [3, 1, 7], [4, 0, 9, 1], [64, 65, 1, 130]]


@pytest.mark.parametrize("lens", LENS, ids=lambda l: "-".join(map(str, l)))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_index_helpers_match_loops(lens, dtype, device):
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=dtype, device=device)
    assert prepare_lens(cu).tolist() == lens
    assert prepare_cu_seqlens_from_lens(torch.tensor(lens, device=device)).tolist() == cu.tolist()
    pos = [p for n in lens for p in range(n)]
    seq = [i for i, n in enumerate(lens) for _ in range(n)]
    assert prepare_position_ids(cu).tolist() == pos
    assert prepare_sequence_ids(cu).tolist() == seq
    assert prepare_token_indices(cu).tolist() == [[s, p] for s, p in zip(seq, pos)]
    for chunk in (1, 4, 64):
        n_chunks = [(n + chunk - 1) // chunk for n in lens]
        assert prepare_chunk_indices(cu, chunk).tolist() == [[i, c] for i, k in enumerate(n_chunks) for c in range(k)]
        offsets = [0]
        for k in n_chunks:
            offsets.append(offsets[-1] + k)
        assert prepare_chunk_offsets(cu, chunk).tolist() == offsets
    # position ids lose empty sequences: round trip through them keeps the non-empty ones
    nonempty = [0] + list(torch.tensor([n for n in lens if n]).cumsum(0).tolist())
    assert prepare_cu_seqlens_from_position_ids(torch.tensor(pos, device=device)).tolist() == nonempty


def test_mask_helpers(device):
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], device=device)
    assert prepare_lens_from_mask(mask).tolist() == [3, 5, 1]
    cu = prepare_cu_seqlens_from_mask(mask)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 8, 9]
    assert prepare_cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1]])).tolist() == [0, 3, 5]
    # a packed window that starts mid-document still starts a sequence at 0
    assert prepare_cu_seqlens_from_position_ids(torch.tensor([7, 8, 0, 1])).tolist() == [0, 2, 4]
