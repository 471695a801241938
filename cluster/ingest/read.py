"""Reading a split with Ray Data, and the helpers every modality's ingest shares (text and speech).

Lazy reads re-cut into small blocks, the block-size limits, the in-memory-shuffle decision, and the
stable hold-out of validation rows. ``cluster.ingest.datasets`` (text) and ``cluster.ingest.speech`` build on these.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import ray.data

from cluster.ingest.rows import PATH_COLUMN, RowRules, check_batch
from cluster.ingest.splits import DataInfo, SplitInfo
from engine.preprocessing.chat import as_messages
from engine.preprocessing.datafiles import ARROW_STREAM


class ArrowStreamDatasource(ray.data.datasource.FileBasedDatasource):
    """Ray Data reader of the Arrow stream files behind a Hugging Face ``datasets`` split (its cache, or a
    ``save_to_disk`` folder): one read task per file, a block per record batch, streamed to the workers.

    Not ``ray.data.from_huggingface``: for a ``datasets.Dataset`` it first asks the hub for the split's parquet
    export (an HTTP request without a timeout, which hangs on a machine with no network even with
    ``HF_HUB_OFFLINE=1``), and otherwise falls back to ``from_arrow`` of the whole table, copied into the object
    store from the driver. Reading the files the dataset already lives in needs neither.
    """

    _FILE_EXTENSIONS = ["arrow"]

    def _read_stream(self, f: Any, path: str) -> Any:
        import pyarrow as pa

        for batch in pa.ipc.open_stream(f):
            yield pa.Table.from_batches([batch])


def read_arrow_stream_files(files: list[str], **kwargs: Any) -> ray.data.Dataset:
    """A lazy Ray dataset over Arrow stream files (``shuffle``, ``include_paths`` as for the other readers)."""
    return ray.data.read_datasource(ArrowStreamDatasource(files, **kwargs))


READERS = {"parquet": ray.data.read_parquet, "json": ray.data.read_json, "csv": ray.data.read_csv, ARROW_STREAM: read_arrow_stream_files}


def read_split(
    split: SplitInfo, rows_per_block: int, shuffle_seed: int | None = None, recut: bool = True, rules: RowRules | None = None,
) -> ray.data.Dataset:
    """Read a split's files lazily, re-cut into blocks of ``rows_per_block`` rows (streaming).

    Small files otherwise arrive as a single block, which starves all but one worker and Ray Data task.
    ``recut=False`` keeps the reader's blocks (parquet row groups, in read units of a few MiB) and skips the
    re-cut, a copy of every row through the object store: rows that carry audio bytes then go from the read
    blocks straight to featurising. ``shuffle_seed`` reads the files in a seeded random order (the same on
    every execution, for resume).
    """
    shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=False) if shuffle_seed is not None else None
    with_paths = rules is not None and PATH_COLUMN not in split.columns  # never over a column of the data's own
    dataset = READERS[split.format](split.files, shuffle=shuffle, include_paths=with_paths)
    if rules is not None:  # every row checked as it streams (fused with the read); the first bad one stops the run
        dataset = dataset.map_batches(check_batch, fn_kwargs=dict(rules=rules, with_paths=with_paths), batch_format="numpy", batch_size=None)
    return dataset.repartition(target_num_rows_per_block=rows_per_block) if recut else dataset


MAX_BLOCK_BYTES = 16 * 2**20
"""Largest Ray Data block (Ray's default is 128 MiB): the parquet reader packs small files into one read
task, and with 128 MiB blocks a dataset of a few small files became one block larger than a small object
store, which then spilled instead of streaming."""


PARQUET_READ_UNIT_BYTES = 2 * 2**20
"""On-disk parquet bytes per read task (Ray packs row groups up to 128 MiB into one task by default: a
few small files became one task that read the whole split ahead of tokenization, into the store)."""


def limit_block_size(max_bytes: int = MAX_BLOCK_BYTES) -> None:
    """Cap ``DataContext.target_max_block_size`` and the parquet read unit (for executions this driver
    plans), so Ray Data can pace reads by task and the store holds a few blocks, not the split."""
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = min(ctx.target_max_block_size or max_bytes, max_bytes)
    os.environ.setdefault("RAY_DATA_PARQUET_BIN_PACKING_BYTES", str(PARQUET_READ_UNIT_BYTES))


def fits_in_object_store(split: SplitInfo, share: float = 0.2, expansion: float = 4.0) -> bool:
    """Whether a split (its files' bytes x ``expansion`` for decompression) fits in ``share`` of the object
    store. Such a split's blocks are shuffled in memory; a larger one is shuffled by file order at read time,
    because shuffling blocks materialises the whole split (it would spill to disk instead of streaming)."""
    from engine.checkpoints.storage import file_sizes

    try:  # local files and object storage alike: the same split shuffles the same way wherever it lives
        size = sum(file_sizes(split.files))
    except OSError:  # unreadable sizes: treat as large
        return False
    return size * expansion <= share * ray.cluster_resources().get("object_store_memory", 0)


def holdout_mask(texts: Any, fraction: float) -> np.ndarray:
    """Stable per-row choice of the validation rows (CRC32 of the text), the same on every read."""
    return np.array([zlib.crc32(holdout_key(t).encode()) % 10_000 < fraction * 10_000 for t in texts], dtype=bool)


def holdout_key(value: Any) -> str:
    """The text a row is hashed by: itself, or a chat as JSON (the same from pyarrow lists and Ray's arrays)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(as_messages(value))
    except (TypeError, KeyError, AttributeError):
        return str(value)


def select_rows(batch: dict[str, np.ndarray], column: str, fraction: float, validation: bool) -> dict[str, np.ndarray]:
    """The held-out rows of a batch (``validation``) or the rest, by :func:`holdout_mask` of ``column``."""
    keep = holdout_mask(batch[column], fraction)
    keep = keep if validation else ~keep
    return {k: v[keep] for k, v in batch.items()}


def train_and_validation(
    info: DataInfo, rules: dict[str, RowRules], seed: int, fraction: float, column: str,
    read: Callable[[SplitInfo, RowRules, int | None], ray.data.Dataset], folder: Callable[[SplitInfo], str | None],
) -> tuple[dict[str, tuple[ray.data.Dataset, str | None]], int]:
    """The raw ``train`` and ``validation`` datasets of a media split (each with the folder its relative paths resolve
    against), and the number of training rows.

    ``read(split, rules, shuffle_seed)`` reads one split. Without a validation split, ``fraction`` of the training
    rows are held out by a stable hash of ``column`` and the rest are counted by a streaming pass. A training split
    small enough for the object store is shuffled block by block in memory, else by file order at read time.
    """
    train_split = info.splits["train"]
    in_memory_shuffle = fits_in_object_store(train_split)
    train = read(train_split, rules["train"], None if in_memory_shuffle else seed)
    num_train_rows = train_split.num_rows
    if "validation" in info.splits:
        validation, val_dir = read(info.splits["validation"], rules["validation"], None), folder(info.splits["validation"])
    else:
        kwargs = dict(column=column, fraction=fraction)
        validation, val_dir = train.map_batches(select_rows, fn_kwargs={**kwargs, "validation": True}, batch_format="numpy"), folder(train_split)
        train = train.map_batches(select_rows, fn_kwargs={**kwargs, "validation": False}, batch_format="numpy")
        num_train_rows = train.count()
    if in_memory_shuffle:
        train = train.randomize_block_order(seed=seed)
    return {"train": (train, folder(train_split)), "validation": (validation, val_dir)}, num_train_rows
