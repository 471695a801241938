"""Ray Data ingest on the driver: read, hold out validation, tokenize with the checkpoint's tokenizer.

Datasets stay lazy and stream into the workers (``ray.train.get_dataset_shard``); nothing is
materialised on the driver.
"""

from __future__ import annotations

import functools
import json
import os
import zlib
from typing import Any

import numpy as np
import ray.data
import ray.train

from cluster.data_rows import PATH_COLUMN, RowRules, check_batch
from cluster.preflight import DataInfo, SplitInfo, row_rules
from engine.config import SPEECH_TASKS, JobSpec
from engine.datafiles import ARROW_STREAM
from engine.chat import TRUNCATED, as_messages, encode_conversations, layout_columns, with_system
from engine.packing import group_rows_by_length, length_grouping_window
from engine.seq2seq import encode_pairs
from engine.preprocess import cached_tokenizer, tokenize_batch


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
    try:
        size = sum(os.path.getsize(f) for f in split.files)
    except OSError:  # remote files: treat as large
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


def _select_rows(batch: dict[str, np.ndarray], column: str, fraction: float, validation: bool) -> dict[str, np.ndarray]:
    keep = holdout_mask(batch[column], fraction)
    keep = keep if validation else ~keep
    return {k: v[keep] for k, v in batch.items()}


def _tokenize_rows(batch: dict[str, np.ndarray], tokenizer_name: str, revision: str | None, **kwargs: Any) -> dict[str, np.ndarray]:
    return tokenize_batch(batch, tokenizer=cached_tokenizer(tokenizer_name, revision), **kwargs)


def _encode_conversation_rows(batch: dict[str, np.ndarray], tokenizer_name: str, revision: str | None, seq2seq: bool = False,
                              **kwargs: Any) -> dict[str, np.ndarray]:
    encode = encode_pairs if seq2seq else encode_conversations
    return encode(batch, tokenizer=cached_tokenizer(tokenizer_name, revision), **kwargs)


def preprocess(
    ds: ray.data.Dataset, job: JobSpec, labels: list[str] | None, tokenizer_name: str | None = None, keep_ids: bool = False,
) -> ray.data.Dataset:
    """Tokenize ``ds`` with the checkpoint's tokenizer inside ``map_batches``; only model inputs remain
    (and ``sample_id`` from ``data.id_column`` when ``keep_ids``: the training split, for resume audits;
    prompt/completion and chat layouts then also mark the rows cut to ``data.max_length``)."""
    if job.data.layout != "text":
        fn = functools.partial(
            _encode_conversation_rows, tokenizer_name=tokenizer_name or job.model.name, revision=job.model.revision,
            layout=job.data.layout, columns=layout_columns(job.data), max_length=job.data.max_length,
            system_prompt=job.data.system_prompt, chat_template=job.data.chat_template, mark_truncated=keep_ids,
            id_column=job.data.id_column if keep_ids else None, seq2seq=job.model.task == "seq2seq",
        )
        return ds.map_batches(fn, batch_format="numpy", batch_size=job.data.rows_per_block)
    fn = functools.partial(
        _tokenize_rows,
        tokenizer_name=tokenizer_name or job.model.name,
        revision=job.model.revision,
        task=job.model.task,
        text_column=job.data.text_column,
        text_pair_column=job.data.text_pair_column,
        label_column=job.data.label_column if job.model.task != "causal_lm" else None,
        labels=labels,
        max_length=job.data.max_length,
        id_column=job.data.id_column if keep_ids else None,
    )
    return ds.map_batches(fn, batch_format="numpy", batch_size=job.data.rows_per_block)


def build_datasets(job: JobSpec, info: DataInfo) -> tuple[dict[str, ray.data.Dataset], int]:
    """The tokenized ``train`` and ``validation`` datasets, and the number of training rows.

    Without a validation split, ``data.validation_fraction`` of the training rows (chosen by a stable hash
    of their text) are held out; the remaining rows are counted by a streaming pass. Speech tasks read
    audio manifests and featurise with the checkpoint's feature extractor (``cluster.data_speech``).
    """
    limit_block_size()
    if job.model.task in SPEECH_TASKS:
        from cluster.data_speech import build_speech_datasets

        return build_speech_datasets(job, info)
    in_memory_shuffle = fits_in_object_store(info.splits["train"])
    rules = {name: row_rules(job, split, info.labels) for name, split in info.splits.items()}
    train = read_split(info.splits["train"], job.data.rows_per_block, shuffle_seed=None if in_memory_shuffle else job.seed, rules=rules["train"])
    num_train_rows = info.splits["train"].num_rows
    if "validation" in info.splits:
        validation = read_split(info.splits["validation"], job.data.rows_per_block, rules=rules["validation"])
    else:
        fraction, column = job.data.validation_fraction, next(iter(layout_columns(job.data).values()))
        if fraction <= 0:
            raise ValueError("no data.validation and data.validation_fraction is 0")
        validation = train.map_batches(_select_rows, fn_kwargs=dict(column=column, fraction=fraction, validation=True), batch_format="numpy")
        train = train.map_batches(_select_rows, fn_kwargs=dict(column=column, fraction=fraction, validation=False), batch_format="numpy")
        num_train_rows = train.count()
    datasets = {"train": train.randomize_block_order(seed=job.seed) if in_memory_shuffle else train, "validation": validation}
    datasets = {name: preprocess(ds, job, info.labels, keep_ids=name == "train") for name, ds in datasets.items()}
    if job.data.layout != "text":
        datasets["train"] = drop_truncation_marks(datasets["train"], job.data.max_length)
    if window := length_grouping_window(job):  # perf.group_by_length: similar lengths in each micro-batch
        datasets["train"] = datasets["train"].map_batches(
            group_rows_by_length, fn_kwargs=dict(micro_batch=job.optim.batch_size, seed=job.seed), batch_format="numpy", batch_size=window
        )
    return datasets, num_train_rows


def drop_truncation_marks(train: ray.data.Dataset, max_length: int) -> ray.data.Dataset:
    """Count (one streaming pass) and log the training rows cut to ``data.max_length``, then drop the marks."""
    cut = train.sum(TRUNCATED) or 0
    if cut:
        from cluster.console import say

        say(f"data.max_length {max_length}: {cut} training rows were longer and were cut (their start; the last answer kept)")
    return train.drop_columns([TRUNCATED])


def generation_samples(job: JobSpec, info: DataInfo) -> list[dict[str, Any]]:
    """The first ``eval.generation_samples`` validation prompts (the held-out rows when there is no
    validation split) with their reference answers: ``{"messages": [...], "reference": str}``, the
    messages ending with the user turn the last answer replies to."""
    count = job.eval.generation_samples
    if job.data.layout == "text" or count == 0:
        return []
    from cluster.preflight_text import iter_column

    split = info.splits.get("validation") or info.splits["train"]
    held_out = "validation" not in info.splits
    columns = layout_columns(job.data)
    keys = iter_column(split.files, split.format, next(iter(columns.values())))
    if job.data.layout == "chat":
        rows = ({"messages": as_messages(v)} for v in keys)
    else:
        completions = iter_column(split.files, split.format, columns["completion"])
        rows = ({"messages": [{"role": "user", "content": str(p)}, {"role": "assistant", "content": str(c)}]} for p, c in zip(keys, completions))
    samples = []
    for row in rows:
        messages = row["messages"]
        if held_out and not holdout_mask([json.dumps(messages) if job.data.layout == "chat" else messages[0]["content"]], job.data.validation_fraction)[0]:
            continue
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        samples.append({"messages": with_system(messages[:last], job.data.system_prompt), "reference": messages[last]["content"]})
        if len(samples) == count:
            break
    return samples


class EveryRowDataConfig(ray.train.DataConfig):
    """Ray Train's ingest, except that evaluation datasets reach every row exactly once, on any number of
    workers.

    Ray Train splits every dataset with ``streaming_split(equal=True)``, which drops rows so each worker
    gets as many: 75 validation rows on two workers scored 74. The datasets named in ``uneven`` (the
    validation split) are split with ``equal=False`` instead: no row dropped or repeated, the workers' shares
    may differ, and the metrics are reduced as sums over workers (``engine.loop.evaluate``).
    """

    def __init__(self, uneven: tuple[str, ...] = ("validation",), **kwargs: Any):
        super().__init__(**kwargs)
        self.uneven = set(uneven)

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
        even = {name: ds for name, ds in datasets.items() if name not in self.uneven}
        output = super().configure(even, world_size, worker_handles, worker_node_ids, **kwargs)
        for name in sorted(self.uneven & datasets.keys()):
            ds = datasets[name]
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)  # as Ray Train does for the others
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[rank][name] = split
        return output


def build_eval_dataset(job: JobSpec, split: SplitInfo, labels: list[str] | None, tokenizer_name: str) -> ray.data.Dataset:
    """A tokenized dataset for evaluating a finished model on ``split`` (the exported model's tokenizer)."""
    if job.model.task in SPEECH_TASKS:
        from cluster.data_speech import build_speech_eval_dataset

        return build_speech_eval_dataset(job, split, labels, tokenizer_name)
    return preprocess(read_split(split, job.data.rows_per_block, rules=row_rules(job, split, labels)), job, labels, tokenizer_name)
