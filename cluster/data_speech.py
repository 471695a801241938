"""Ray Data ingest of speech: manifests (csv/jsonl of path + label or transcript) or parquet with audio bytes.

Decoding, resampling and feature extraction run inside ``map_batches`` with the checkpoint's own
feature extractor (:func:`engine.preprocess_speech.featurize_batch`); rows come out of each block sorted
by length, so training batches are length-grouped. Relative audio paths are relative to the manifest's folder.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import ray.data

from cluster.preflight import DataInfo, SplitInfo
from engine.config import ASR_TASKS, JobSpec


def manifest_dir(split: SplitInfo) -> str | None:
    """The folder relative audio paths of a split are resolved against (its first manifest's folder)."""
    return os.path.dirname(split.files[0]) if split.files and "://" not in split.files[0] else None


def inline_audio(split: SplitInfo, rows_per_block: int) -> bool:
    """Whether a split is parquet whose row groups are small enough (at most 4 blocks of rows on average)
    for its read blocks to be featurised as they come: the audio bytes then enter the object store once, not
    again as re-cut blocks. Manifests (csv/jsonl of paths) and parquet of a few large row groups are re-cut
    into blocks first, so the decoding spreads over tasks."""
    if split.format != "parquet":
        return False
    try:
        import pyarrow.parquet as pq

        groups = [pq.ParquetFile(f).metadata.num_row_groups for f in split.files]
    except (OSError, ValueError):  # remote files: their footers are not read here
        return False
    return split.num_rows <= 4 * rows_per_block * max(sum(groups), 1)


def read_audio_split(split: SplitInfo, job: JobSpec, labels: list[str] | None, shuffle_seed: int | None = None) -> ray.data.Dataset:
    """:func:`cluster.data.read_split` of a speech split, re-cut into blocks unless :func:`inline_audio`."""
    from cluster.data import read_split

    from cluster.preflight import row_rules

    recut = not inline_audio(split, job.data.rows_per_block)
    return read_split(split, job.data.rows_per_block, shuffle_seed=shuffle_seed, recut=recut, rules=row_rules(job, split, labels))


def _featurize_rows(batch: dict[str, np.ndarray], model_name: str, revision: str | None, tokenizer_name: str | None,
                    language: str | None, asr_task: str, **kwargs: Any) -> dict[str, np.ndarray]:
    from engine.models.speech import load_feature_extractor, load_target_tokenizer
    from engine.preprocess_speech import featurize_batch

    tokenizer = load_target_tokenizer(tokenizer_name, revision, language, asr_task) if tokenizer_name else None
    return featurize_batch(batch, feature_extractor=load_feature_extractor(model_name, revision), tokenizer=tokenizer, **kwargs)


def featurize(ds: ray.data.Dataset, job: JobSpec, labels: list[str] | None, base_dir: str | None, model_name: str | None = None) -> ray.data.Dataset:
    """Decode, resample and featurise ``ds`` with the checkpoint's feature extractor; only model inputs remain.

    ``model_name``: where the feature extractor and target tokenizer are (default: the job's checkpoint;
    ``shoulders eval`` passes the exported model folder).
    """
    from engine.models.loading import read_config_json

    task = job.model.task
    asr = task in ASR_TASKS
    source = model_name or job.model.name
    tokenizer_name = (model_name or job.model.tokenizer or job.model.name) if asr else None
    start = read_config_json(source, job.model.revision).get("decoder_start_token_id") if task == "speech_seq2seq" else None
    fn = functools.partial(
        _featurize_rows,
        model_name=source,
        revision=job.model.revision,
        tokenizer_name=tokenizer_name,
        language=job.model.language,
        asr_task=job.model.asr_task,
        task=task,
        audio_column=job.data.audio_column,
        max_seconds=job.data.max_audio_seconds,
        allow_resample=job.data.resample,
        base_dir=base_dir,
        label_column=job.data.label_column if task == "audio_classification" else None,
        labels=labels,
        transcript_column=job.data.transcript_column if asr else None,
        max_label_length=job.data.max_length,
        decoder_start_token_id=start,
    )
    return ds.map_batches(fn, batch_format="numpy", batch_size=job.data.rows_per_block)


def build_speech_datasets(job: JobSpec, info: DataInfo) -> tuple[dict[str, ray.data.Dataset], int]:
    """The featurised ``train`` and ``validation`` datasets of a speech job, and the number of training rows."""
    from cluster.data import _select_rows, fits_in_object_store

    train_split = info.splits["train"]
    in_memory_shuffle = fits_in_object_store(train_split)  # else shuffled by file order at read time (parquet with audio bytes)
    train = read_audio_split(train_split, job, info.labels, shuffle_seed=None if in_memory_shuffle else job.seed)
    num_train_rows = train_split.num_rows
    if "validation" in info.splits:
        validation, val_dir = read_audio_split(info.splits["validation"], job, info.labels), manifest_dir(info.splits["validation"])
    else:
        kwargs = dict(column=job.data.audio_column, fraction=job.data.validation_fraction)
        validation, val_dir = train.map_batches(_select_rows, fn_kwargs={**kwargs, "validation": True}, batch_format="numpy"), manifest_dir(train_split)
        train = train.map_batches(_select_rows, fn_kwargs={**kwargs, "validation": False}, batch_format="numpy")
        num_train_rows = train.count()
    datasets = {
        "train": featurize(train.randomize_block_order(seed=job.seed) if in_memory_shuffle else train, job, info.labels, manifest_dir(train_split)),
        "validation": featurize(validation, job, info.labels, val_dir),
    }
    return datasets, num_train_rows


def build_speech_eval_dataset(job: JobSpec, split: SplitInfo, labels: list[str] | None, model_dir: str) -> ray.data.Dataset:
    """A featurised dataset for evaluating an exported model folder on ``split``."""
    return featurize(read_audio_split(split, job, labels), job, labels, manifest_dir(split), model_name=model_dir)
