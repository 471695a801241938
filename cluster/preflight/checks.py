"""Checks that run on the driver before any Ray worker starts: data files, columns, labels, model.

Only pyarrow and ``transformers`` configs are touched here (no torch, no Ray), and only the metadata and
the label column are read, never the dataset itself.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cluster.ingest.rows import RowRules, bad_row_message, column_values, first_bad_row, open_dataset
from cluster.preflight.text import check_text, text_required_columns
from engine.config.schema import DatasetSource, JobSpec
from engine.errors import JobError
from engine.checkpoints.storage import is_uri
from engine.preprocessing.datafiles import ARROW_STREAM, open_files
from engine.tasks import get_task

EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
FORMAT_NAMES = {"parquet": "parquet", "jsonl": "json", "csv": "csv"}


@dataclass
class SplitInfo:
    """One data split after checking: its files, format and row count."""

    name: str
    files: list[str]
    format: str
    num_rows: int
    columns: list[str] = field(default_factory=list)


@dataclass
class DataInfo:
    """What the checks learned about a job's data; travels to the workers in the loop config."""

    splits: dict[str, SplitInfo] = field(default_factory=dict)
    labels: list[str] | None = None


def resolve_files(path: str, key: str) -> list[str]:
    """The data files a source names: a file, a folder (its data files) or a glob, on a local path or a URI
    (``s3://bucket/train/``, ``s3://bucket/train/*.parquet``), listed through :mod:`engine.checkpoints.storage`."""
    if is_uri(path):
        files = remote_files(path, key)
    else:
        local = os.path.expanduser(path.removeprefix("file://"))
        if os.path.isdir(local):
            files = sorted(str(p) for p in Path(local).rglob("*") if p.suffix.lower() in EXTENSIONS)
        else:
            files = sorted(glob.glob(local)) if any(c in local for c in "*?[") else ([local] if os.path.isfile(local) else [])
        files = [os.path.abspath(f) for f in files]
    if not files:
        raise JobError(
            f"{key}: '{path}' does not exist or holds no data files (.parquet, .jsonl, .csv). "
            "Fix the path (relative paths are relative to the directory you run shoulders from)."
        )
    return files


def remote_files(uri: str, key: str) -> list[str]:
    """The data files at a URI: the object itself, the data files under a prefix, or those matching a glob."""
    import fnmatch

    from engine.checkpoints import storage

    base, query = storage.split_query(uri)
    try:
        if any(c in base for c in "*?["):
            folder = base[: base.rfind("/", 0, min(base.find(c) for c in "*?[" if c in base))]
            listed = storage.list_folder(folder + query, recursive=True)
            return [f for f, kind in listed if kind == "file" and fnmatch.fnmatch(storage.split_query(f)[0], base)]
        kind = storage.file_type(uri)
        if kind == "file":
            return [uri]
        if kind == "dir":
            listed = storage.list_folder(uri, recursive=True)
            return [f for f, k in listed if k == "file" and Path(storage.split_query(f)[0]).suffix.lower() in EXTENSIONS]
        return []
    except JobError:
        raise
    except Exception as exc:  # pyarrow raises OSError and ArrowInvalid for storage failures
        raise JobError(f"{key}: could not list '{base}': {storage.storage_error(uri, exc)}") from None


def detect_format(files: list[str], declared: str, key: str) -> str:
    """The pyarrow format name of ``files`` (declared in ``data.format`` or from their extensions)."""
    if declared != "auto":
        return FORMAT_NAMES[declared]
    found = {EXTENSIONS.get(Path(f).suffix.lower()) for f in files}
    if None in found or len(found) != 1:
        raise JobError(f"{key}: cannot tell the format of {files[:3]}; set data.format to parquet, jsonl or csv.")
    return found.pop()


def check_split(job: JobSpec, name: str, path: str | DatasetSource) -> SplitInfo:
    """Check one split: files exist (or the Hugging Face dataset and its split), the needed columns are there,
    it is not empty."""
    key = f"data.{name}"
    if isinstance(path, DatasetSource):
        from cluster.preflight.hf import dataset_split_files

        files, expected_rows = dataset_split_files(path, key)
        fmt, where = ARROW_STREAM, path.describe()
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
    for column_key in required_columns(job):
        column = getattr(job.data, column_key)
        if column not in columns:
            raise JobError(
                f"{key}: column '{column}' (data.{column_key}) is not in {where}; its columns are "
                f"{sorted(columns)}. Set data.{column_key} to the right column."
            )
    if num_rows == 0:
        raise JobError(f"{key}: {where} has no rows. Give a split with data, or remove {key}.")
    return SplitInfo(name=name, files=files, format=fmt, num_rows=num_rows, columns=sorted(columns))


def required_columns(job: JobSpec) -> list[str]:
    """The ``data.*_column`` keys the job's task reads (the layout's, for prompt/completion and chat data)."""
    if job.data.layout != "text":
        return text_required_columns(job)
    return get_task(job.model.task).required_columns(job)


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
    if not get_task(job.model.task).has_classes:
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
    if get_task(job.model.task).modality == "audio":
        from cluster.preflight.speech import check_speech

        check_speech(job, splits)
    check_text(job, splits)  # prompt/completion and chat rows, the chat template
    labels = check_labels(job, splits)
    for split in splits.values():
        check_sample(job, split, labels)
    check_retention(job)
    return DataInfo(splits=splits, labels=labels)


def check_retention(job: JobSpec) -> None:
    """``safeguards.retention_data``: readable files with the text column, not empty."""
    spec = job.safeguards
    if not (spec.track_forgetting and spec.retention_data) or is_uri(spec.retention_data) or get_task(job.model.task).modality != "text":
        return
    key = "safeguards.retention_data"
    files = resolve_files(spec.retention_data, key)
    fmt = detect_format(files, "auto", key)
    try:
        dataset = open_dataset(files, fmt)
        columns, rows = dataset.schema.names, dataset.count_rows()
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise JobError(f"{key}: could not read '{spec.retention_data}' as {fmt}: {str(exc).splitlines()[0]}") from None
    if job.data.text_column not in columns:
        raise JobError(f"{key}: '{spec.retention_data}' has no column '{job.data.text_column}' (data.text_column); its columns are {sorted(columns)}.")
    if rows == 0:
        raise JobError(f"{key}: '{spec.retention_data}' has no rows. Give general text of the source domain, or remove {key}.")


TEXT_COLUMN_KEYS = ("text_column", "text_pair_column", "transcript_column", "prompt_column", "completion_column")
"""``data.*`` column keys whose values must be text."""
SAMPLE_FILES = 64
SAMPLE_ROWS = 256
"""Rows checked before the run in each of the first :data:`SAMPLE_FILES` files of a split; later rows are
checked while streaming."""


def row_rules(job: JobSpec, split: SplitInfo, labels: list[str] | None) -> RowRules:
    """What each row of ``split`` must hold (the same rules before the run and while streaming)."""
    keys = required_columns(job)
    return RowRules(
        split=split.name,
        text_columns=tuple(getattr(job.data, k) for k in keys if k in TEXT_COLUMN_KEYS),
        label_column=job.data.label_column if "label_column" in keys else None,
        labels=tuple(labels) if labels and "label_column" in keys else None,
        other_columns=tuple(getattr(job.data, k) for k in keys if k not in TEXT_COLUMN_KEYS and k != "label_column"),
        skip=job.data.bad_rows == "skip",
        fmt=split.format,
        files=tuple(split.files),
    )


def check_sample(job: JobSpec, split: SplitInfo, labels: list[str] | None) -> None:
    """The first :data:`SAMPLE_ROWS` rows of each of the first files (local or in object storage): readable,
    and no bad row (unless skipped)."""
    rules = row_rules(job, split, labels)
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


def check_model(job: JobSpec) -> None:
    """The model (hub id or folder) is there, readable and able to do the job as set (``cluster.preflight.model``)."""
    from cluster.preflight.model import check_model_files

    check_model_files(job)


RAY_RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""The file Ray Train keeps in a run folder; a TorchTrainer with the same run folder resumes from it."""


def run_dir_location(job: JobSpec) -> str:
    """The Ray Train run folder of a job: ``output.dir``/train, or ``run.storage_path``/<job name> (a local
    path or a URI)."""
    from engine.checkpoints.storage import join

    if job.run.storage_path is None:
        return str(job.output_dir / "train")
    return join(job.run.storage_path, job.name)


def run_started(run_dir: str) -> bool:
    """Whether a Train run has begun in ``run_dir`` (local or object storage): Ray's snapshot or a checkpoint
    folder is there (the workers may have written one that a killed driver never registered; resume starts from it)."""
    from engine.checkpoints import storage
    from engine.checkpoints.store import RunFolder

    try:
        return storage.exists(storage.join(run_dir, RAY_RUN_SNAPSHOT)) or bool(RunFolder.at(run_dir).checkpoints())
    except OSError as exc:
        raise JobError(f"could not read the run folder '{storage.split_query(run_dir)[0]}': {storage.storage_error(run_dir, exc)}") from None


def check_output(job: JobSpec, resume: bool = False) -> None:
    """Refuse to overwrite a finished run's output folder unless resuming, and to silently continue an
    unfinished one: Ray Train resumes a run whose folder it finds, so that must be asked for (``--resume``)."""
    out = job.output_dir
    if not resume and (out / "metrics.json").exists():
        raise JobError(
            f"output.dir '{out}' already holds a finished run (metrics.json). "
            "Choose another output.dir or name, or remove the folder."
        )
    if not resume and job.output.uri and storage_exists(job.results_location, "metrics.json"):
        raise JobError(f"output.uri '{job.results_location}' already holds a finished run (metrics.json). "
                       "Choose another output.uri or name, or remove it.")
    run_dir = run_dir_location(job)
    started = run_started(run_dir)
    if not resume and started:
        raise JobError(
            f"'{run_dir}' holds an unfinished run of this job. Pass --resume to continue it from its latest "
            "checkpoint, or choose another output.dir or name, or remove the folder."
        )
    if resume and not started:
        raise JobError(
            f"--resume: there is no run to resume in '{run_dir}' (no {RAY_RUN_SNAPSHOT}, no checkpoint folder); "
            "train without --resume."
        )


def storage_exists(location: str, file_name: str) -> bool:
    """Whether ``location``/``file_name`` exists (local or object storage)."""
    from engine.checkpoints import storage

    return storage.exists(storage.join(location, file_name))


def check_writable(path: Path, key: str) -> None:
    """``path`` is, or can be made as, a folder this user writes: the nearest existing ancestor is a writable folder."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe == path and not path.is_dir():
        raise JobError(f"{key} '{path}' is a file, not a folder. Choose another {key} or name.")
    if not probe.is_dir():
        raise JobError(f"{key} '{path}' lies under '{probe}', which is a file, so the folder cannot be made. Choose another {key}.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise JobError(f"{key} '{path}': '{probe}' is not writable by this user. Choose a folder you can write, e.g. under your home.")


def check_storage(job: JobSpec) -> None:
    """``run.storage_path`` and ``output.uri`` are writable: a local folder's permissions, or for a URI a probe
    object written and removed (about a second; one line naming the URI and what failed)."""
    from engine.checkpoints import storage

    for key, location in (("run.storage_path", job.run.storage_path), ("output.uri", job.output.uri and job.results_location)):
        if not location:
            continue
        if is_uri(location):
            storage.check_writable(location, key)
        else:
            check_writable(Path(storage.local_path(location)), key)


def check_resources(job: JobSpec, cpus: float | None = None, gpus: float | None = None, extra_cpus: float = 0.0, what: str = "the run") -> None:
    """The job's workers fit the cluster: this machine's CPUs for an embedded Ray (before it starts), the
    cluster's resources once connected. Ray would otherwise wait for them forever."""
    if cpus is None:
        ray = sys.modules.get("ray")  # only when this process already imported it: the checks stay Ray-free
        if ray is not None and ray.is_initialized():
            resources = ray.cluster_resources()
            cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        elif os.environ.get("RAY_ADDRESS"):
            return  # a cluster's resources are known once connected (cluster.run.trainer checks them then)
        else:
            cpus, gpus = float(os.cpu_count() or 1), None
    scaling = job.scaling
    need = scaling.num_workers * scaling.cpus_per_worker + extra_cpus
    if need > cpus + 1e-9:
        raise JobError(
            f"scaling: {what} needs {need:g} CPUs (scaling.num_workers {scaling.num_workers} x scaling.cpus_per_worker "
            f"{scaling.cpus_per_worker:g}{f' + {extra_cpus:g} for its data' if extra_cpus else ''}) but the Ray cluster has "
            f"{cpus:g}. Lower scaling.num_workers or scaling.cpus_per_worker (fractions are fine), or use a larger cluster."
        )
    if scaling.use_gpu is True and gpus is not None and scaling.num_workers > gpus:
        raise JobError(
            f"scaling: {scaling.num_workers} workers with scaling.use_gpu true need {scaling.num_workers} GPUs but the Ray "
            f"cluster has {gpus:g}. Lower scaling.num_workers or set scaling.use_gpu: auto."
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
    check_writable(job.output_dir, "output.dir")
    check_storage(job)
    check_resources(job)
    info = check_data(job)
    check_output(job, resume)
    if get_task(job.model.task).modality == "audio":
        from cluster.preflight.speech import prepare_speech_job

        job = prepare_speech_job(job, info)
    return with_absolute_paths(job), info
