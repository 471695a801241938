"""The per-worker validation cache of the training loop."""

from __future__ import annotations

import torch

from engine.loop.batches import ValidationBatches


class FakeShard:
    """A Ray Data shard stand-in that counts its passes."""

    def __init__(self, rows: int):
        self.rows, self.passes = rows, 0

    def iter_torch_batches(self, batch_size, collate_fn):
        self.passes += 1
        for start in range(0, self.rows, batch_size):
            n = min(batch_size, self.rows - start)
            yield {"input_ids": torch.arange(start, start + n).reshape(n, 1), "labels": torch.zeros(n, dtype=torch.long)}


def ids(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch["input_ids"].flatten()]


def test_small_validation_is_read_once_and_replayed_unchanged():
    shard = FakeShard(10)
    batches = ValidationBatches(shard, batch_size=4, max_bytes=2**20)
    first = ids(batches)
    for batch in batches:  # a consumer that rewrites the dicts it gets must not change the cache
        batch["input_ids"] = batch["input_ids"] * 0
    assert first == list(range(10)) and ids(batches) == first
    assert shard.passes == 1


def test_validation_over_the_budget_or_with_caching_off_streams_every_time():
    for max_bytes in (100, 0):  # 10 rows x 2 int64 columns = 160 bytes
        shard = FakeShard(10)
        batches = ValidationBatches(shard, batch_size=4, max_bytes=max_bytes)
        assert ids(batches) == ids(batches) == list(range(10))
        assert shard.passes == 2
