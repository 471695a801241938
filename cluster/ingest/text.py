"""Ray Data ingest of text: read, hold out validation, tokenize with the checkpoint's tokenizer.

Datasets stay lazy and stream into the workers (``ray.train.get_dataset_shard``); nothing is
materialised on the driver.
"""

from __future__ import annotations

import json
from typing import Any

import ray.data

from cluster.ingest.read import (
    fits_in_object_store,
    holdout_mask,
    read_split,
    select_rows,
)
from cluster.ingest.rows import RowRules
from cluster.ingest.splits import DataInfo, SplitInfo
from engine.config.schema import JobSpec
from engine.preprocessing.chat import (
    TRUNCATED,
    as_messages,
    layout_columns,
    with_system,
)
from engine.preprocessing.packing import group_rows_by_length, length_grouping_window
from engine.tasks import get_task


def preprocess(
    ds: ray.data.Dataset, job: JobSpec, labels: list[str] | None, tokenizer_name: str | None = None, keep_ids: bool = False,
) -> ray.data.Dataset:
    """Tokenize ``ds`` with the checkpoint's tokenizer inside ``map_batches``; only model inputs remain
    (and ``sample_id`` from ``data.id_column`` when ``keep_ids``: the training split, for resume audits;
    prompt/completion and chat layouts then also mark the rows cut to ``data.max_length``)."""
    fn = get_task(job.model.task).batch_preprocessor(job, labels, source=tokenizer_name, keep_ids=keep_ids)
    return ds.map_batches(fn, batch_format="numpy", batch_size=job.data.rows_per_block)


def build_text_datasets(job: JobSpec, info: DataInfo, rules: dict[str, RowRules]) -> tuple[dict[str, ray.data.Dataset], int]:
    """The tokenized ``train`` and ``validation`` datasets, and the number of training rows.

    Without a validation split, ``data.validation_fraction`` of the training rows (chosen by a stable hash
    of their text) are held out; the remaining rows are counted by a streaming pass. ``rules``: each split's
    row rules (every streamed row is checked against them).
    """
    in_memory_shuffle = fits_in_object_store(info.splits["train"])
    train = read_split(info.splits["train"], job.data.rows_per_block, shuffle_seed=None if in_memory_shuffle else job.seed, rules=rules["train"])
    num_train_rows = info.splits["train"].num_rows
    if "validation" in info.splits:
        validation = read_split(info.splits["validation"], job.data.rows_per_block, rules=rules["validation"])
    else:
        fraction, column = job.data.validation_fraction, next(iter(layout_columns(job.data).values()))
        if fraction <= 0:
            raise ValueError("no data.validation and data.validation_fraction is 0")
        validation = train.map_batches(select_rows, fn_kwargs=dict(column=column, fraction=fraction, validation=True), batch_format="numpy")
        train = train.map_batches(select_rows, fn_kwargs=dict(column=column, fraction=fraction, validation=False), batch_format="numpy")
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
        from cluster.run.console import say

        say(f"data.max_length {max_length}: {cut} training rows were longer and were cut (their start; the last answer kept)")
    return train.drop_columns([TRUNCATED])


def generation_samples(job: JobSpec, info: DataInfo) -> list[dict[str, Any]]:
    """The first ``eval.generation_samples`` validation prompts (the held-out rows when there is no
    validation split) with their reference answers: ``{"messages": [...], "reference": str}``, the
    messages ending with the user turn the last answer replies to."""
    count = job.eval.generation_samples
    if job.data.layout == "text" or count == 0:
        return []
    from cluster.ingest.rows import iter_column

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


def build_text_eval_dataset(job: JobSpec, split: SplitInfo, labels: list[str] | None, tokenizer_name: str, rules: RowRules) -> ray.data.Dataset:
    """A tokenized dataset for evaluating a finished model on ``split`` (the exported model's tokenizer)."""
    return preprocess(read_split(split, job.data.rows_per_block, rules=rules), job, labels, tokenizer_name)
