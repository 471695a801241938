"""The preflight: every check a job must pass before Ray starts anything (``train``, ``tune`` and ``validate``
run this), in one place: the model's files, the output and run folders, the resources, the data.

Only pyarrow and ``transformers`` configs are touched (no torch, no Ray).
"""

from __future__ import annotations

import os

from cluster.ingest.splits import DataInfo
from cluster.modalities import modality_of
from cluster.preflight.data import check_data
from cluster.preflight.output import check_output, check_resources, check_storage, check_writable
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


def preflight_checks(job: JobSpec, resume: bool = False) -> DataInfo:
    """Every refusal a job can meet before Ray starts, in the order ``train`` meets them; writes nothing.
    ``shoulders validate`` runs exactly this, so a job it passes is never refused by :func:`preflight`."""
    check_model(job)
    check_writable(job.output_dir, "output.dir")
    check_storage(job)
    check_resources(job)
    info = check_data(job)
    check_output(job, resume)
    return info


def preflight(job: JobSpec, resume: bool = False) -> tuple[JobSpec, DataInfo]:
    """All checks a job must pass before Ray starts anything (:func:`preflight_checks`); returns the job as the
    workers get it (the modality's preparation, e.g. a CTC vocabulary) with absolute paths."""
    info = preflight_checks(job, resume)
    job = modality_of(job).prepare_job(job, info)
    return with_absolute_paths(job), info
