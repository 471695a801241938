"""The preflight: every check a job must pass before Ray starts anything (``train``, ``tune`` and ``validate``
run this), in one place: the model's files, the output and run folders, the resources, the data.

Only pyarrow and ``transformers`` configs are touched (no torch, no Ray).
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster.ingest.splits import DataInfo, is_uri
from cluster.modalities import modality_of
from cluster.preflight.data import check_data
from cluster.preflight.output import check_output, check_resources, check_writable
from engine.config.schema import JobSpec


def check_model(job: JobSpec) -> None:
    """The model (hub id or folder) is there, readable and able to do the job as set (``cluster.preflight.model``)."""
    from cluster.preflight.model import check_model_files

    check_model_files(job)


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
    if job.run.storage_path and not is_uri(job.run.storage_path):
        check_writable(Path(job.run.storage_path).expanduser().resolve(), "run.storage_path")
    check_resources(job)
    info = check_data(job)
    check_output(job, resume)
    job = modality_of(job).prepare_job(job, info)
    return with_absolute_paths(job), info
