"""The data checks before any worker starts: every split's files, columns and rows, the labels, the modality's own
checks (``cluster.modalities``), a sample of rows against the rules every streamed row meets later.

Only pyarrow is touched here (no torch, no Ray), and only the metadata, the label column and the sampled rows
are read, never the whole dataset."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.ingest.rows import (
    bad_row_message,
    column_values,
    first_bad_row,
    open_dataset,
)
from cluster.ingest.splits import (
    DataInfo,
    SplitInfo,
    detect_format,
    resolve_files,
)
from cluster.modalities import modality_of
from engine.config.data_section import DatasetSource
from engine.config.schema import JobSpec
from engine.errors import JobError
from engine.preprocessing.datafiles import ARROW_STREAM


def check_split(job: JobSpec, name: str, path: str | DatasetSource) -> SplitInfo:
    """Check one split: files exist (or the Hugging Face dataset and its split), the needed columns are there,
    it is not empty."""
    key = f"data.{name}"
    if isinstance(path, DatasetSource):
        from cluster.preflight.hf import dataset_split_files

        files, expected_rows = dataset_split_files(path, key)
        fmt, where = ARROW_STREAM, path.describe()
    elif own := modality_of(job).resolve_split(job, key, path):  # a layout of the modality's (an image folder)
        (files, fmt), expected_rows, where = own, None, f"'{path}'"
    else:
        files, expected_rows = resolve_files(path, key), None
        fmt, where = detect_format(files, job.data.format, key), f"'{path}'"
    try:
        dataset = open_dataset(files, fmt)
        columns = set(dataset.schema.names)
        num_rows = dataset.count_rows()
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise JobError(f"{key}: could not read {where} as {fmt}: {exc}") from None
    if expected_rows is not None and num_rows != expected_rows:  # a view (select, shuffle) of its files
        raise JobError(f"{key}: {where} has {expected_rows} rows but its files hold {num_rows}. Save it with "
                       f"flatten_indices() and save_to_disk, and give that folder as {key}: {{hf_disk: folder}}.")
    for column_key in modality_of(job).required_columns(job):
        column = getattr(job.data, column_key)
        if column not in columns:
            raise JobError(
                f"{key}: column '{column}' (data.{column_key}) is not in {where}; its columns are "
                f"{sorted(columns)}. Set data.{column_key} to the right column."
            )
    if num_rows == 0:
        raise JobError(f"{key}: {where} has no rows. Give a split with data, or remove {key}.")
    return SplitInfo(name=name, files=files, format=fmt, num_rows=num_rows, columns=sorted(columns))

def class_label_names(split: SplitInfo, column: str) -> list[str] | None:
    """The class names a Hugging Face dataset declares for ``column`` (a ``ClassLabel`` feature, kept in the
    Arrow schema's ``huggingface`` metadata by ``datasets``: its files, ``save_to_disk``, ``to_parquet``), or None."""
    metadata = open_dataset(split.files, split.format).schema.metadata or {}
    try:
        features = json.loads(metadata.get(b"huggingface") or b"{}").get("info", {}).get("features", {})
    except ValueError:  # somebody else's metadata under that key: no class names from it
        return None
    feature = features.get(column) if isinstance(features, dict) else None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return [str(name) for name in feature["names"]]
    return None

def check_labels(job: JobSpec, splits: dict[str, SplitInfo]) -> list[str] | None:
    """The class names: the job's, else those of a Hugging Face ``ClassLabel`` column (its integers index
    them), checked against every split; else the sorted values found in training."""
    if "label_column" not in modality_of(job).required_columns(job):  # the targets are not class names
        return None
    declared = job.model.labels or class_label_names(splits["train"], job.data.label_column)
    found_train: set[str] = set()
    for split in splits.values():
        table = open_dataset(split.files, split.format).to_table(columns=[job.data.label_column])
        values = {str(v) for v in table.column(0).to_pylist() if v is not None}
        if split.name == "train":
            found_train = values
        if declared is not None:
            extra = sorted(values - set(declared) - {str(i) for i in range(len(declared))})
            if extra:
                where = "model.labels" if job.model.labels else f"the ClassLabel names of data.train's '{job.data.label_column}'"
                unlabelled = " (-1 is how Hugging Face datasets mark an unlabelled row, as in many test splits)" if "-1" in extra else ""
                raise JobError(
                    f"data.{split.name}: column '{job.data.label_column}' holds labels the job does not declare: "
                    f"{extra[:10]}{unlabelled}. Add them to model.labels (the job has {declared}, from {where}) or remove those rows."
                )
    if declared is not None:
        return declared
    if len(found_train) < 2:
        raise JobError(f"data.train: column '{job.data.label_column}' has fewer than 2 distinct labels; classification needs at least 2.")
    return sorted(found_train, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))

def check_data(job: JobSpec) -> DataInfo:
    """Check every split of the job and the labels; raise :class:`JobError` on the first problem."""
    splits = {"train": check_split(job, "train", job.data.train)}
    for name in ("validation", "test"):
        path = getattr(job.data, name)
        if path:
            splits[name] = check_split(job, name, path)
    if "validation" not in splits and job.data.validation_fraction <= 0:
        raise JobError("data.validation is not set and data.validation_fraction is 0: give a validation split or a fraction > 0 to hold out.")
    modality = modality_of(job)
    modality.check_data(job, splits)
    labels = check_labels(job, splits)
    for split in splits.values():
        check_sample(job, split, labels)
    modality.check_retention(job)
    return DataInfo(splits=splits, labels=labels)

SAMPLE_FILES = 64

SAMPLE_ROWS = 256
"""Rows checked before the run in each of the first :data:`SAMPLE_FILES` files of a split; later rows are
checked while streaming."""

def check_sample(job: JobSpec, split: SplitInfo, labels: list[str] | None) -> None:
    """The first :data:`SAMPLE_ROWS` rows of each of the first files (local or in object storage): readable,
    and no bad row (unless skipped)."""
    rules = modality_of(job).row_rules(job, split, labels)
    for path in split.files[:SAMPLE_FILES]:
        try:
            table = open_dataset([path], split.format).head(SAMPLE_ROWS, columns=rules.columns)
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise JobError(f"data.{split.name}: could not read '{path}' as {split.format}: {str(exc).splitlines()[0]}. Is it UTF-8 {split.format}?") from None
        found = first_bad_row(rules, {c: column_values(table.column(c)) for c in rules.columns})
        if found and not rules.skip:
            raise JobError(bad_row_message(rules, path, found[0] + 1, found[1]))

def read_export_job(model_dir: Path) -> tuple[JobSpec, list[str] | None]:
    """The job and class names an export was trained with (its ``shoulders_job.json``)."""
    import json

    from engine.checkpoints.export import JOB_FILE
    from engine.config.schema import build_job

    meta_path = model_dir / JOB_FILE
    if not meta_path.is_file():
        raise JobError(f"'{model_dir}' is not a shoulders export (no {JOB_FILE}); pass the model folder of a finished run.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        raw_job, labels = meta["job"], meta.get("labels")
        if not isinstance(raw_job, dict) or not (labels is None or isinstance(labels, list)):
            raise ValueError("'job' must be an object and 'labels' a list")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise JobError(f"'{meta_path}' is not a shoulders export record ({str(exc).splitlines()[0]}). Export the run again (shoulders train).") from None
    return build_job(raw_job, str(meta_path)), labels

def check_eval_data(job: JobSpec, labels: list[str] | None, path: str) -> DataInfo:
    """An evaluation file for an export: readable, the job's columns, only labels the model knows, no bad rows."""
    split = check_split(job, "eval", path)
    if labels is not None:
        job = job.model_copy(update={"model": job.model.model_copy(update={"labels": labels})})
        check_labels(job, {"eval": split})
    check_sample(job, split, labels)
    return DataInfo(splits={"eval": split}, labels=labels)
