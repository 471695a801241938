"""The run's folders and resources before it starts: the output and run folders writable, no finished or unfinished run
overwritten without ``--resume``, the workers fit the machine or the cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cluster.ingest.splits import is_uri
from engine.config.schema import JobSpec
from engine.errors import JobError

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
    from engine.checkpoints.store import RunFolder

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
