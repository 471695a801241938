"""Batches for the loop: the collate that turns Ray Data's numpy batches into tensors, this worker's
training stream for one epoch (resumable), its validation batches (cached), and batch sizes."""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from engine.config.schema import JobSpec
from engine.loop.state import TrainState
from engine.preprocessing.packing import pack_batch
from engine.preprocessing.text import trim_batch


class Collate(NumpyBatchCollateFn):
    """Trim unused padding (or pack causal-LM rows to ``pack_to`` tokens) and turn numpy columns into
    tensors (on the host, in Ray Data's prefetch thread, which then pins them and copies them to the GPU)."""

    def __init__(self, pack_to: int | None = None, pad_token_id: int = 0):
        self.pack_to, self.pad_token_id = pack_to, pad_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        batch = pack_batch(batch, self.pack_to, self.pad_token_id) if self.pack_to else trim_batch(batch)
        return {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}


collate = Collate()


def batch_rows(batch: dict[str, torch.Tensor]) -> int:
    """Examples in a batch, whatever its input key (``input_ids``, ``input_values``, ``input_features``)."""
    return int(next(iter(batch.values())).shape[0])


def batch_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens a batch trains on: text's attention-mask sum; for speech, the transcript tokens (ASR) or the clips."""
    if "input_ids" in batch:
        mask = batch.get("attention_mask")
        return mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
    labels = batch.get("labels")
    if labels is not None and labels.ndim == 2:
        return (labels != -100).sum()
    return torch.tensor(batch_rows(batch), device=next(iter(batch.values())).device)


def epoch_batches(
    shard: Any, job: JobSpec, state: TrainState, collate_fn: Collate, device: torch.device, grouped: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's training batches of ``state.epoch``, from ``state.batches_in_epoch`` on.

    The epoch's order is deterministic (the local shuffle is seeded with ``job.seed + epoch``; rows grouped
    by length are not shuffled), so on resume the batches the checkpoint already trained on are skipped.
    """
    batches = shard.iter_torch_batches(
        batch_size=job.optim.batch_size, collate_fn=collate_fn, prefetch_batches=job.perf.prefetch_batches,
        pin_memory=device.type == "cuda",  # Ray's prefetch thread copies pinned batches to the GPU: fast DMA, no staging
        local_shuffle_buffer_size=None if grouped else 4 * job.optim.batch_size, local_shuffle_seed=job.seed + state.epoch,
    )
    return itertools.islice(batches, state.batches_in_epoch, None)


class ValidationBatches:
    """This worker's validation batches: streamed from its Ray Data shard on the first pass and kept in
    memory when they take at most ``max_bytes``, so later evaluations skip the Ray Data execution (on 2
    cores that was ~2.5 of the 3.2 s an evaluation of 75 rows took). Iterating yields fresh dicts."""

    def __init__(self, shard: Any, batch_size: int, max_bytes: int):
        self.shard, self.batch_size, self.max_bytes = shard, batch_size, max_bytes
        self.cached: list[dict[str, torch.Tensor]] | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.cached is not None:
            yield from (dict(batch) for batch in self.cached)
            return
        kept: list[dict[str, torch.Tensor]] | None = [] if self.max_bytes > 0 else None
        size = 0
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, collate_fn=collate):
            if kept is not None:
                size += sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
                if size <= self.max_bytes:
                    kept.append(dict(batch))
                else:
                    kept = None
            yield batch
        self.cached = kept
