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
