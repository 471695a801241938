"""Ray Data ingest of speech: manifests (csv/jsonl of path + label or transcript) or parquet with audio bytes.

Decoding, resampling and feature extraction run inside ``map_batches`` with the checkpoint's own
feature extractor (the task's ``batch_preprocessor``: :func:`engine.preprocessing.speech.featurize_batch`); rows come out of each block sorted
by length, so training batches are length-grouped. Relative audio paths are relative to the manifest's folder.
"""

from __future__ import annotations

import os

import ray.data

from cluster.ingest.read import read_split, train_and_validation
from cluster.ingest.rows import RowRules
from cluster.ingest.splits import DataInfo, SplitInfo
from engine.config.schema import JobSpec
from engine.tasks import get_task


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


def read_audio_split(split: SplitInfo, job: JobSpec, rules: RowRules, shuffle_seed: int | None = None) -> ray.data.Dataset:
    """:func:`cluster.ingest.read.read_split` of a speech split, re-cut into blocks unless :func:`inline_audio`."""
    recut = not inline_audio(split, job.data.rows_per_block)
    return read_split(split, job.data.rows_per_block, shuffle_seed=shuffle_seed, recut=recut, rules=rules)


def featurize(ds: ray.data.Dataset, job: JobSpec, labels: list[str] | None, base_dir: str | None, model_name: str | None = None) -> ray.data.Dataset:
    """Decode, resample and featurise ``ds`` with the checkpoint's feature extractor; only model inputs remain.

    ``model_name``: where the feature extractor and target tokenizer are (default: the job's checkpoint;
    ``shoulders eval`` passes the exported model folder).
    """
    fn = get_task(job.model.task).batch_preprocessor(job, labels, source=model_name, base_dir=base_dir)
    return ds.map_batches(fn, batch_format="numpy", batch_size=job.data.rows_per_block)


def build_speech_datasets(job: JobSpec, info: DataInfo, rules: dict[str, RowRules]) -> tuple[dict[str, ray.data.Dataset], int]:
    """The featurised ``train`` and ``validation`` datasets of a speech job, and the number of training rows
    (``rules``: each split's row rules)."""
    raw, num_train_rows = train_and_validation(
        info, rules, job.seed, job.data.validation_fraction, job.data.audio_column,
        read=lambda split, split_rules, seed: read_audio_split(split, job, split_rules, shuffle_seed=seed), folder=manifest_dir,
    )
    return {name: featurize(ds, job, info.labels, folder) for name, (ds, folder) in raw.items()}, num_train_rows


def build_speech_eval_dataset(job: JobSpec, split: SplitInfo, labels: list[str] | None, model_dir: str, rules: RowRules) -> ray.data.Dataset:
    """A featurised dataset for evaluating an exported model folder on ``split``."""
    return featurize(read_audio_split(split, job, rules), job, labels, manifest_dir(split), model_name=model_dir)
