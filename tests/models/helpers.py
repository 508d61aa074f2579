"""Helpers shared by the model-family tests: left-padded batches and a cache-free greedy reference."""

import torch


def left_padded_batch(lens, T, device, vocab_size):
    """Random ids [B, T] (ids >= 3, pads = 0) and a 0/1 mask whose row b has its ``lens[b]`` real tokens last."""
    ids = torch.randint(3, vocab_size, (len(lens), T), device=device)
    mask = torch.zeros(len(lens), T, dtype=torch.long, device=device)
    for b, n in enumerate(lens):
        mask[b, T - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def greedy_reference(model, ids, mask, steps, eos=2, pad=0):
    """Greedy continuation of each row on its own, without a cache; after EOS, generate() pads."""
    rows = []
    for b in range(ids.shape[0]):
        seq, new = ids[b, mask[b].bool()][None], []
        for _ in range(steps):
            if eos in new:
                new.append(pad)
                continue
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            new.append(int(nxt))
        rows.append(torch.tensor(new, device=ids.device))
    return torch.stack(rows)


def check_padded_equals_packed(model, ids, mask, tol):
    """A padded batch (``mask`` [B, T], padding anywhere) gives the same logits at its real tokens as the same
    sequences packed into one row with ``cu_seqlens``, and as each sequence run alone."""
    from fla.utils.testing import assert_close

    real = mask.bool()
    padded = model(ids, attention_mask=mask).logits
    lens = real.sum(1)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    packed = model(ids[real][None], cu_seqlens=cu).logits
    assert_close("padded vs packed", padded[real][None], packed, tol)
    for b in range(ids.shape[0]):
        alone = model(ids[b, real[b]][None]).logits
        assert_close(f"row {b}", padded[b, real[b]][None], alone, tol)


def check_cached_decoding(model, T, prefill, device, vocab_size, tol, on_step=None):
    """Random left padding (one full row, one whose prefill columns are all padding, one random): prefill
    ``prefill`` columns with ``use_cache``, then decode one column per step; every row's logits must equal a
    cache-free forward of that row alone. ``on_step(cache)`` runs after every decode step. Returns the cache."""
    from fla.models.utils import Cache
    from fla.utils.testing import assert_close

    lens = [T, int(torch.randint(1, T - prefill + 1, ())), int(torch.randint(1, T + 1, ()))]
    ids, mask = left_padded_batch(lens, T, device, vocab_size)
    with torch.no_grad():
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, Cache) and cache.get_seq_length() == prefill
        logits = [out.logits]
        for t in range(prefill, T):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache
            logits.append(out.logits)
            if on_step is not None:
                on_step(cache)
        logits = torch.cat(logits, 1)
        assert all(cache.get_seq_length(i) == T for i in range(len(cache)))
        for b, n in enumerate(lens):
            ref = model(ids[b:b + 1, T - n:], use_cache=False).logits
            assert_close(f"row {b}", logits[b:b + 1, T - n:], ref, tol)
    return cache
