"""Checks that run on the driver before any Ray worker starts: data files, columns, labels, model.

Only pyarrow and ``transformers`` configs are touched here (no torch, no Ray), and only the metadata and
the label column are read, never the dataset itself.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from cluster.preflight_text import check_text, text_required_columns
from engine.config import ASR_TASKS, SPEECH_TASKS, JobSpec
from engine.errors import JobError

EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
FORMAT_NAMES = {"parquet": "parquet", "jsonl": "json", "csv": "csv"}


@dataclass
class SplitInfo:
    """One data split after checking: its files, format and row count."""

    name: str
    files: list[str]
    format: str
    num_rows: int


@dataclass
class DataInfo:
    """What the checks learned about a job's data; travels to the workers in the loop config."""

    splits: dict[str, SplitInfo] = field(default_factory=dict)
    labels: list[str] | None = None


def is_uri(path: str) -> bool:
    """Whether ``path`` names a remote filesystem (``s3://``, ``gs://``, ...) rather than a local path."""
    return "://" in path and not path.startswith("file://")


def resolve_files(path: str, key: str) -> list[str]:
    """The data files a source names: a file, a folder (its data files) or a glob."""
    if is_uri(path):
        return [path]
    local = os.path.expanduser(path.removeprefix("file://"))
    if os.path.isdir(local):
        files = sorted(str(p) for p in Path(local).rglob("*") if p.suffix.lower() in EXTENSIONS)
    else:
        files = sorted(glob.glob(local)) if any(c in local for c in "*?[") else ([local] if os.path.isfile(local) else [])
    if not files:
        raise JobError(
            f"{key}: '{path}' does not exist or holds no data files (.parquet, .jsonl, .csv). "
            "Fix the path (relative paths are relative to the directory you run shoulders from)."
        )
    return [os.path.abspath(f) for f in files]


def detect_format(files: list[str], declared: str, key: str) -> str:
    """The pyarrow format name of ``files`` (declared in ``data.format`` or from their extensions)."""
    if declared != "auto":
        return FORMAT_NAMES[declared]
    found = {EXTENSIONS.get(Path(f).suffix.lower()) for f in files}
    if None in found or len(found) != 1:
        raise JobError(f"{key}: cannot tell the format of {files[:3]}; set data.format to parquet, jsonl or csv.")
    return found.pop()


def open_dataset(files: list[str], fmt: str):
    """A lazy pyarrow dataset over ``files``."""
    import pyarrow.dataset as pads

    return pads.dataset(files, format=fmt)


def check_split(job: JobSpec, name: str, path: str) -> SplitInfo:
    """Check one split: files exist, the needed columns are there, it is not empty."""
    key = f"data.{name}"
    files = resolve_files(path, key)
    fmt = detect_format(files, job.data.format, key)
    try:
        dataset = open_dataset(files, fmt)
        columns = set(dataset.schema.names)
        num_rows = dataset.count_rows()
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise JobError(f"{key}: could not read '{path}' as {fmt}: {exc}") from None
    for column_key in required_columns(job):
        column = getattr(job.data, column_key)
        if column not in columns:
            raise JobError(
                f"{key}: column '{column}' (data.{column_key}) is not in '{path}'; its columns are "
                f"{sorted(columns)}. Set data.{column_key} to the right column."
            )
    if num_rows == 0:
        raise JobError(f"{key}: '{path}' has no rows. Give a split with data, or remove {key}.")
    return SplitInfo(name=name, files=files, format=fmt, num_rows=num_rows)


def required_columns(job: JobSpec) -> list[str]:
    """The ``data.*_column`` keys the job's task reads."""
    if job.model.task in SPEECH_TASKS:
        from cluster.preflight_speech import speech_required_columns

        return speech_required_columns(job)
    if job.data.layout != "text":
        return text_required_columns(job)
    keys = ["text_column"]
    if job.data.text_pair_column:
        keys.append("text_pair_column")
    if job.model.task != "causal_lm":
        keys.append("label_column")
    return keys


def check_labels(job: JobSpec, splits: dict[str, SplitInfo]) -> list[str] | None:
    """The class names: the job's, checked against every split, or the sorted values found in training."""
    if job.model.task in ("causal_lm", *ASR_TASKS):
        return None
    declared = job.model.labels
    found_train: set[str] = set()
    for split in splits.values():
        table = open_dataset(split.files, split.format).to_table(columns=[job.data.label_column])
        values = {str(v) for v in table.column(0).to_pylist() if v is not None}
        if split.name == "train":
            found_train = values
        if declared is not None:
            extra = sorted(values - set(declared) - {str(i) for i in range(len(declared))})
            if extra:
                raise JobError(
                    f"data.{split.name}: column '{job.data.label_column}' holds labels the job does not declare: "
                    f"{extra[:10]}. Add them to model.labels (now {declared}) or remove those rows."
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
    if job.model.task in SPEECH_TASKS:
        from cluster.preflight_speech import check_speech

        check_speech(job, splits)
    check_text(job, splits)  # prompt/completion and chat rows, the chat template
    return DataInfo(splits=splits, labels=check_labels(job, splits))


def check_model(job: JobSpec) -> None:
    """The model exists (hub id or folder with a config) and its architecture can do the job's task."""
    from engine.models.loading import check_task_supported

    name = job.model.name
    if os.path.sep in name and not os.path.isdir(os.path.expanduser(name)) and not is_uri(name):
        raise JobError(f"model.name: folder '{name}' does not exist. Give an existing folder or a hub id (org/model).")
    if os.path.isdir(os.path.expanduser(name)) and not (Path(name).expanduser() / "config.json").is_file():
        raise JobError(
            f"model.name: folder '{name}' is not a model: it has no config.json. "
            "Point it at a folder written by save_pretrained, or use a hub id."
        )
    check_task_supported(name, job.model.task, job.model.revision)


RAY_RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""The file Ray Train keeps in a run folder; a TorchTrainer with the same run folder resumes from it."""


def local_run_dir(job: JobSpec) -> Path | None:
    """The Ray Train run folder of a job on local storage (None for a URI, which is not checked here)."""
    if job.run.storage_path is None:
        return job.output_dir / "train"
    return None if is_uri(job.run.storage_path) else Path(job.run.storage_path).expanduser().resolve() / job.name


def run_started(run_dir: Path) -> bool:
    """Whether a Train run has begun in ``run_dir``: Ray's snapshot or a checkpoint folder is there (the
    workers may have written one that a killed driver never registered; resume starts from it)."""
    from engine.checkpoint import RunFolder

    return (run_dir / RAY_RUN_SNAPSHOT).exists() or bool(RunFolder.local(run_dir).checkpoints())


def check_output(job: JobSpec, resume: bool = False) -> None:
    """Refuse to overwrite a finished run's output folder unless resuming, and to silently continue an
    unfinished one: Ray Train resumes a run whose folder it finds, so that must be asked for (``--resume``)."""
    out = job.output_dir
    if not resume and (out / "metrics.json").exists():
        raise JobError(
            f"output.dir '{out}' already holds a finished run (metrics.json). "
            "Choose another output.dir or name, or remove the folder."
        )
    run_dir = local_run_dir(job)
    started = run_dir is not None and run_started(run_dir)
    if not resume and started:
        raise JobError(
            f"'{run_dir}' holds an unfinished run of this job. Pass --resume to continue it from its latest "
            "checkpoint, or choose another output.dir or name, or remove the folder."
        )
    if resume and run_dir is not None and not started:
        raise JobError(
            f"--resume: there is no run to resume in '{run_dir}' (no {RAY_RUN_SNAPSHOT}, no checkpoint folder); "
            "train without --resume."
        )


def with_absolute_paths(job: JobSpec) -> JobSpec:
    """The job with a local model folder made absolute (workers run in other directories)."""
    name = os.path.expanduser(job.model.name)
    if os.path.isdir(name):
        return job.model_copy(update={"model": job.model.model_copy(update={"name": os.path.abspath(name)})})
    return job


def preflight(job: JobSpec, resume: bool = False) -> tuple[JobSpec, DataInfo]:
    """All checks a job must pass before Ray starts anything; returns the job with absolute paths."""
    check_model(job)
    info = check_data(job)
    check_output(job, resume)
    if job.model.task in SPEECH_TASKS:
        from cluster.preflight_speech import prepare_speech_job

        job = prepare_speech_job(job, info)
    return with_absolute_paths(job), info
