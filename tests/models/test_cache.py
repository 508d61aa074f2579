"""fla.models.utils.Cache: per-layer counters, state updates, batch reordering, legacy format, coercion."""

import pytest
import torch
from transformers.cache_utils import Cache as HFCache
from transformers.cache_utils import DynamicCache

from fla.models.utils import Cache


def test_is_a_transformers_cache_and_not_compileable():
    cache = Cache()
    assert isinstance(cache, HFCache)
    assert not cache.is_compileable and not cache.is_croppable and not cache.is_initialized
    assert len(cache) == 0 and cache.get_seq_length() == 0 and cache.batch_size == -1
    assert cache.get_max_length() == -1


def test_seen_tokens_per_layer_can_be_set():
    """For code that advances the states on the device (CUDA-graph replays): the counts follow by hand."""
    cache = Cache()
    for layer_idx in range(2):
        cache.update(recurrent_state=torch.zeros(2, 1, 3, 3), layer_idx=layer_idx, offset=4)
    assert cache.seen_tokens_per_layer() == (4, 4)
    cache.set_seen_tokens([5, 6])
    assert cache.seen_tokens_per_layer() == (5, 6) and cache.get_seq_length(1) == 6 and cache.seen_tokens == 5
    with pytest.raises(ValueError, match="one seen-token count per cached layer"):
        cache.set_seen_tokens([1])
    with pytest.raises(ValueError, match=r"counts\[1\] must be an int >= 0"):
        cache.set_seen_tokens([1, -1])


def test_per_layer_seen_tokens():
    """A layer asking for its past length before its own update sees its own count (FLA issue #747)."""
    cache = Cache()
    state = torch.zeros(2, 1, 3, 3)
    cache.update(recurrent_state=state, layer_idx=0, offset=5)
    assert cache.get_seq_length(0) == 5 and cache.get_seq_length(1) == 0  # layer 1 has not run yet
    cache.update(recurrent_state=state, layer_idx=1, offset=5)
    assert cache.get_seq_length(1) == 5
    cache.update(recurrent_state=state, layer_idx=0, offset=1)
    assert (cache.get_seq_length(0), cache.get_seq_length(1)) == (6, 5)
    assert cache.get_mask_sizes(1, layer_idx=1) == (6, 0)
    assert len(cache) == 2 and cache.batch_size == 2 and cache.seen_tokens == 6


def test_update_replaces_states_and_keeps_unset_ones():
    cache = Cache()
    conv = (torch.zeros(1, 4, 4),) * 3
    first = cache.update(recurrent_state=torch.zeros(1, 2, 2, 2), conv_state=conv, layer_idx=0, offset=3)
    new = torch.ones(1, 2, 2, 2)
    second = cache.update(recurrent_state=new, layer_idx=0, offset=1)
    assert second is first and second["recurrent_state"] is new and second["conv_state"] is conv
    assert cache[0] is second and set(second) >= {"recurrent_state", "attn_state", "conv_state", "ffn_state"}
    cache.update(layer_idx=0, offset=0, compressed=torch.ones(1, 5))  # extra named states
    assert torch.equal(cache[0]["compressed"], torch.ones(1, 5))


def test_attn_state_append_window_and_replace():
    cache = Cache()
    k = torch.arange(6.0).view(1, 6, 1)
    cache.update(attn_state=(k, -k), layer_idx=0, offset=6)
    cache.update(attn_state=(k[:, :2] + 10, -k[:, :2] - 10), layer_idx=0, offset=2)
    keys, values = cache[0]["attn_state"]
    assert keys.shape == (1, 8, 1) and torch.equal(values, -keys)
    cache.update(attn_state=(k[:, :1] + 20, k[:, :1]), layer_idx=0, offset=1, cache_kwargs={"window_size": 4})
    assert cache[0]["attn_state"][0].flatten().tolist() == [5.0, 10.0, 11.0, 20.0]
    cache.update(attn_state=(k,), layer_idx=1, offset=6, cache_kwargs={"attn_state_mode": "replace"})
    cache.update(attn_state=(k[:, :2],), layer_idx=1, offset=0, cache_kwargs={"attn_state_mode": "replace"})
    assert cache[1]["attn_state"][0].shape == (1, 2, 1)
    with pytest.raises(ValueError, match="attn_state_mode"):
        cache.update(attn_state=(k,), layer_idx=1, cache_kwargs={"attn_state_mode": "roll"})
    with pytest.raises(ValueError, match="tuple"):
        cache.update(attn_state=k, layer_idx=1)


def test_batch_reordering():
    cache = Cache()
    r = torch.arange(3.0).view(3, 1, 1, 1)
    cache.update(recurrent_state=r, conv_state=(r[:, 0], r[:, 0] + 1, r[:, 0] + 2), layer_idx=0, offset=4)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache[0]["recurrent_state"].flatten().tolist() == [2.0, 2.0, 0.0]
    assert cache[0]["conv_state"][1].flatten().tolist() == [3.0, 3.0, 1.0]
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert cache[0]["recurrent_state"].flatten().tolist() == [2.0, 0.0]
    cache.batch_repeat_interleave(2)
    assert cache[0]["recurrent_state"].flatten().tolist() == [2.0, 2.0, 0.0, 0.0]
    assert cache.get_seq_length() == 4
    with pytest.raises(ValueError, match="cropped"):
        cache.crop(2)
    cache.reset()
    assert len(cache) == 0 and cache.get_seq_length() == 0


def test_legacy_round_trip_and_coercion():
    cache = Cache()
    cache.update(recurrent_state=torch.ones(1, 1, 2, 2), layer_idx=0, offset=3)
    legacy = cache.to_legacy_cache()
    assert isinstance(legacy, tuple) and torch.equal(legacy[0]["recurrent_state"], torch.ones(1, 1, 2, 2))
    restored = Cache.from_legacy_cache(legacy, seen_tokens=3)
    assert restored.get_seq_length(0) == 3 and torch.equal(restored[0]["recurrent_state"], legacy[0]["recurrent_state"])

    assert Cache.coerce(cache) is cache
    assert isinstance(Cache.coerce(None), Cache)
    assert isinstance(Cache.coerce(DynamicCache()), Cache)  # what generate() passes to the first forward
    assert Cache.coerce(legacy).get_seq_length(0) == 0 and len(Cache.coerce(legacy)) == 1
    filled = DynamicCache()
    filled.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
    with pytest.raises(ValueError, match="non-empty"):
        Cache.coerce(filled)
    with pytest.raises(ValueError, match="past_key_values"):
        Cache.coerce("cache")


def test_invalid_update_arguments():
    cache = Cache()
    with pytest.raises(ValueError, match="layer_idx"):
        cache.update(layer_idx=-1)
    with pytest.raises(ValueError, match="offset"):
        cache.update(layer_idx=0, offset=1.5)
    with pytest.raises(ValueError, match="window_size"):
        cache.update(attn_state=(torch.zeros(1, 1),), layer_idx=0, cache_kwargs={"window_size": 0})
    with pytest.raises(KeyError):
        cache[3]
