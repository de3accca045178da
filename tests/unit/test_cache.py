"""KVCache: writes land at each row's own positions; slot ranges are views, never copies."""

from __future__ import annotations

import pytest
import torch

from lmcore.cache import KVCache

pytestmark = pytest.mark.unit

LAYERS, SLOTS, HEADS, MAX_LEN, HEAD_DIM = 2, 4, 2, 8, 3


def make_cache() -> KVCache:
    return KVCache(LAYERS, SLOTS, HEADS, MAX_LEN, HEAD_DIM)


def test_a_slot_range_is_written_and_read_in_place() -> None:
    cache = make_cache()
    k = torch.randn(2, HEADS, 1, HEAD_DIM)
    v = torch.randn(2, HEADS, 1, HEAD_DIM)
    positions = torch.tensor([[5], [2]])
    keys, values = cache.update(1, k, v, positions, rows=slice(1, 3))
    # Views of cache rows 1 and 2 of layer 1: the engine's decode step must not copy the cache.
    assert keys.data_ptr() == cache.k[1, 1].data_ptr()
    assert values.data_ptr() == cache.v[1, 1].data_ptr()
    assert keys.shape == (2, HEADS, MAX_LEN, HEAD_DIM)
    torch.testing.assert_close(cache.k[1, 1, :, 5], k[0, :, 0])
    torch.testing.assert_close(cache.v[1, 2, :, 2], v[1, :, 0])
    written = torch.zeros(LAYERS, SLOTS, MAX_LEN, dtype=torch.bool)
    written[1, 1, 5] = written[1, 2, 2] = True
    assert torch.equal(cache.k.abs().sum(dim=(2, 4)) != 0, written)  # nothing else touched


def test_a_slot_range_must_match_the_batch() -> None:
    cache = make_cache()
    k = torch.randn(2, HEADS, 1, HEAD_DIM)
    with pytest.raises(ValueError, match="rows"):
        cache.update(0, k, k, torch.tensor([[0], [0]]), rows=slice(0, 3))


def test_without_rows_the_batch_covers_the_first_cache_rows() -> None:
    cache = make_cache()
    k = torch.randn(SLOTS, HEADS, 3, HEAD_DIM)
    positions = torch.arange(3).expand(SLOTS, 3)
    keys, _ = cache.update(0, k, k, positions)
    assert keys.data_ptr() == cache.k[0].data_ptr()
    torch.testing.assert_close(cache.k[0, :, :, :3], k)


def test_a_mask_cut_to_the_filled_prefix_covers_only_those_positions() -> None:
    cache = make_cache()
    mask = cache.attention_mask(torch.tensor([[2], [4]]), kv_len=5)
    assert mask.shape == (2, 1, 1, 5)
    assert mask[0, 0, 0].tolist() == [True, True, True, False, False]
    assert mask[1, 0, 0].tolist() == [True] * 5
    assert cache.attention_mask(torch.tensor([[2]])).shape[-1] == MAX_LEN
