"""``shoulders init``: a starter job for a task and a model, printed as commented YAML that validates.

The data layout comes from the task, the columns from its modality (those the preflight requires) with the schema's defaults, so the starter
names exactly the columns ``shoulders validate`` will look for. Torch-free.
"""

from __future__ import annotations

import re

from engine.config.schema import build_job
from engine.errors import JobError
from cluster.modalities import modality_of
from engine.tasks.base import TASK_MODULES, find_task


def job_name(model: str) -> str:
    """A job name from the model's last path part (``org/Model-7B`` -> ``model-7b``)."""
    return re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-") or "job"


def starter_job(task_name: str, model: str) -> str:
    """The YAML text of a starter job for ``task_name`` on ``model``.

    Raises:
        JobError: ``task_name`` is not a task.
    """
    task = find_task(task_name)
    if task is None:
        raise JobError(f"shoulders init: --task '{task_name}' is not a task; one of {', '.join(TASK_MODULES)}.")
    name = job_name(model)
    layout = "text" if "text" in task.layouts else task.layouts[0]
    placeholder = {"name": name, "model": {"name": model, "task": task_name}, "data": {"train": "data/train.jsonl", "layout": layout}}
    job = build_job(placeholder, "shoulders init")
    columns = modality_of(job).required_columns(job)
    lines = [
        f"# Starter job: model.task {task_name} on {model} (written by shoulders init).",
        "# Point data: at your files, then check everything train checks, in seconds, and train:",
        "#   shoulders validate job.yaml && shoulders train job.yaml",
        "# Every key with its default and meaning: shoulders validate job.yaml --explain",
        f"name: {name}",
        "model:",
        f"  name: {model}  # hub id (org/name) or a folder written by save_pretrained",
        f"  task: {task_name}",
    ]
    if "label_column" in columns:
        lines.append("  # labels: [negative, positive]  # class names in index order; left out, read from the training data")
    lines += [
        "data:",
        "  train: data/train.jsonl  # a .jsonl/.csv/.parquet file, a folder or a glob; or {hf: ORG/DATASET, split: train}",
        "  validation: data/validation.jsonl  # or leave it out: data.validation_fraction of train is held out",
        "  test: data/test.jsonl  # scored once by the exported model at the end; optional",
    ]
    if layout != "text":
        lines.append(f"  layout: {layout}  # how rows hold the task's input and target")
    lines += [f"  {key}: {getattr(job.data, key)}  # the column the task reads" for key in columns]
    lines += [
        "finetune:",
        "  strategy: light  # feature_extraction | light | full | lora (PEFT adapters; see peft:)",
        "optim:",
        f"  epochs: {job.optim.epochs:g}",
        f"  batch_size: {job.optim.batch_size}",
        "scaling:",
        f"  num_workers: {job.scaling.num_workers}  # Ray Train workers; on a laptop 1-2",
        f"  use_gpu: {str(job.scaling.use_gpu).lower()}  # auto: a GPU per worker when the cluster has them",
        "output:",
        "  dir: runs/{name}",
        "",
    ]
    text = "\n".join(lines)
    import yaml

    build_job(yaml.safe_load(text), "shoulders init")  # the printed job is a valid job
    return text
