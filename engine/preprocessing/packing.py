"""Sequence packing for causal language modelling, and length grouping for classification.

Packing works inside one micro-batch: its examples (padded rows) are laid end to end into as few rows of
``max_length`` as first-fit-decreasing finds, with ``position_ids`` restarting at 0 for every example and
no ``attention_mask``. ``transformers`` then builds a block-diagonal causal mask from the position ids
(``masking_utils.find_packed_sequence_indices``), so no token attends to another example, RoPE sees each
example's own positions, and the first token of every example is never a target. The micro-batch keeps
the same examples, so the optimisation is unchanged; only the padding is gone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE_INDEX = -100


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to at most ``capacity`` (longest examples placed first)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def pack_batch(batch: dict[str, np.ndarray], max_length: int, pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """Pack a right-padded causal-LM micro-batch into fewer rows (see the module docstring).

    Args:
        batch: ``input_ids``, ``attention_mask`` and ``labels`` of shape (rows, width).
        max_length: capacity of a packed row (the job's ``data.max_length``).
        pad_token_id: id written into the unused tail of a packed row (never attended, never a target).

    Returns:
        ``input_ids``, ``labels`` and ``position_ids`` of shape (packed rows, longest packed row), and the
        batch's 1-D per-example columns as they were.
    """
    mask = batch["attention_mask"].astype(bool)
    lengths = [max(int(n), 1) for n in mask.sum(axis=1)]
    capacity = max(max_length, max(lengths))
    bins = first_fit_decreasing(lengths, capacity)
    width = max(sum(lengths[i] for i in b) for b in bins)
    ids = np.full((len(bins), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(bins), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(bins), width), dtype=np.int64)
    source_labels = batch.get("labels", np.where(mask, batch["input_ids"], IGNORE_INDEX))
    for row, members in enumerate(bins):
        at = 0
        for i in sorted(members):
            n = lengths[i]
            ids[row, at : at + n] = batch["input_ids"][i, :n]
            labels[row, at : at + n] = source_labels[i, :n]
            labels[row, at] = IGNORE_INDEX  # never predicted from the previous example's last token
            positions[row, at : at + n] = np.arange(n)
            at += n
        # The tail restarts at position 0: a segment of its own that nothing attends to.
        positions[row, at:] = np.arange(width - at)
    packed = {"input_ids": ids, "labels": labels, "position_ids": positions}
    # Per-example columns (e.g. the sample ids that resume uses) pass through unchanged.
    for key, value in batch.items():
        if key not in packed and key != "attention_mask" and np.ndim(value) == 1:
            packed[key] = value
    return packed


def length_grouping_window(job: Any) -> int | None:
    """Rows per length-grouping window of the job's training data, or None when grouping does not apply
    (``perf.group_by_length`` off, or next-token prediction, which packs instead)."""
    from engine.tasks import get_task

    if not get_task(job.model.task).groups_by_length(job):
        return None
    return job.optim.batch_size * job.perf.group_window


def group_rows_by_length(batch: dict[str, np.ndarray], micro_batch: int, seed: int) -> dict[str, np.ndarray]:
    """One window of rows reordered so that every consecutive ``micro_batch`` rows have similar lengths.

    The slice order is shuffled with a generator seeded by ``seed`` and the window's content, so the same
    data gives the same order on every run and every restart (deterministic resume).
    """
    mask = batch.get("attention_mask")
    content = int(mask.sum()) if mask is not None else len(next(iter(batch.values())))
    groups = group_by_length(batch, micro_batch, seed * 1_000_003 + content)
    return {k: np.concatenate([g[k] for g in groups]) for k in batch} if groups else batch


def group_by_length(batch: dict[str, np.ndarray], micro_batch: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Split a window of rows into micro-batches of similar length (sorted by length, order shuffled).

    Rows are sorted by their ``attention_mask`` length, cut into ``micro_batch``-row slices, and the slices
    are returned in a seeded random order so that long and short batches alternate.
    """
    n = len(next(iter(batch.values())))
    mask = batch.get("attention_mask")
    lengths = mask.sum(axis=1) if mask is not None and mask.ndim == 2 else np.zeros(n)
    order = np.argsort(-lengths, kind="stable")
    slices = [order[i : i + micro_batch] for i in range(0, n, micro_batch)]
    np.random.default_rng(seed).shuffle(slices)
    return [{k: v[idx] for k, v in batch.items()} for idx in slices]
