"""Export the best checkpoint and test the export on a training worker's resources, never in the driver.

The driver of a cluster job runs on a head node, usually without a GPU and with less memory than the workers:
rebuilding the model there (the LoRA merge) and evaluating it on the test split would need the model's memory
and hours of CPU. :func:`export_and_test` runs both in one Ray task that asks for what a training worker asks
for (``scaling.cpus_per_worker``, a GPU when the workers have one), on that task's device; the export is written
straight to its location (``output.uri``/model or ``output.dir``/model) and only the test metrics come back.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import ray

from cluster.ingest.splits import DataInfo
from engine.config.schema import JobSpec


def export_and_test(job: JobSpec, info: DataInfo, checkpoint: Any, location: str, gpu: bool) -> dict[str, float] | None:
    """Export ``checkpoint`` (a ``ray.train.Checkpoint``) to ``location`` and return its test metrics
    (None without a test split), computed in a Ray task with a training worker's resources."""
    # The storage credentials reach this task as they reach the training workers: the job's runtime environment
    # (``cluster.run.trainer.storage_runtime_env``, or a submitted job's own), or the embedded Ray's inherited env.
    task = ray.remote(_export_and_test).options(num_cpus=job.scaling.cpus_per_worker, num_gpus=1 if gpu else 0, max_retries=0)
    return ray.get(task.remote(job, info, checkpoint, location))


def _export_and_test(job: JobSpec, info: DataInfo, checkpoint: Any, location: str) -> dict[str, float] | None:
    from engine.checkpoints import storage
    from engine.checkpoints.export import export_checkpoint

    with checkpoint.as_directory() as folder:
        if storage.is_uri(location):
            with tempfile.TemporaryDirectory(prefix="shoulders-export-") as tmp:
                exported = export_checkpoint(folder, Path(tmp) / "model", info.labels)
                storage.upload_folder(exported, location)
                # the data tasks, on any node, read the export's preprocessing files from the bucket
                return evaluate_export(job, info, exported, preprocessing=location) if "test" in info.splits else None
        exported = export_checkpoint(folder, storage.local_path(location), info.labels)
    return evaluate_export(job, info, exported) if "test" in info.splits else None


def evaluate_export(job: JobSpec, info: DataInfo, export_dir: str | os.PathLike, split: str = "test",
                    preprocessing: str | None = None) -> dict[str, float]:
    """Metrics of the exported model (a local folder) on a split, loaded with plain transformers/peft, streamed
    by Ray Data, on this process's device (a GPU when it has one). ``preprocessing``: where Ray Data's tasks,
    on any node, find the export's preprocessing files (its copy in object storage); default ``export_dir``, a
    folder on this node's disk: then the data tasks run on this node."""
    import torch

    from cluster.ingest.datasets import build_eval_dataset
    from engine.evaluation.exported import evaluate_model, load_exported
    from engine.loop.batches import collate
    from engine.tasks import get_task

    model = load_exported(export_dir, job.model.task, info.labels)
    dataset = build_eval_dataset(job, info.splits[split], info.labels, preprocessing or str(export_dir))
    batches = dataset.iter_torch_batches(batch_size=job.eval.batch_size or 2 * job.optim.batch_size, collate_fn=collate)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = get_task(job.model.task).export_metrics(job, model, export_dir, device)
    return evaluate_model(model, batches, job.model.task, len(info.labels) if info.labels else None, device, metrics=metrics)
