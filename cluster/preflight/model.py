"""Driver-side checks of the model before any worker starts, from its files alone (no torch, no weights loaded).

A hub id and a local folder take the same path (``cluster.preflight.model_files``): ``config.json`` is a model
config whose architecture can do the task, the weights are there and their headers consistent, the modality's
preprocessing files are there (``cluster.modalities``: the tokenizer for text), ``finetune.freeze_depth`` (also in
a tune search space) fits the block count, and ``peft.target_modules`` name modules the architecture has.
"""

from __future__ import annotations

from typing import Any

from cluster.modalities import modality_of
from cluster.preflight.model_files import (
    ModelFiles,
    check_architecture,
    locate_model,
    weight_names,
)
from engine.config.schema import JobSpec
from engine.errors import JobError
from engine.tasks import get_task


def check_depth(value: Any, blocks: int, key: str) -> None:
    """A freeze depth fits ``blocks``: 0..blocks, ``all``, or -blocks..-1."""
    if value is None or value == "all":
        return
    if not isinstance(value, int) or isinstance(value, bool) or not -blocks <= value <= blocks:
        raise JobError(
            f"{key} is {value!r} but the model has {blocks} blocks: use 0..{blocks} (bottom blocks frozen), "
            f"-{blocks}..-1 (all but the top k) or 'all'."
        )

def check_freeze_depths(job: JobSpec, blocks: int) -> None:
    """``finetune.freeze_depth`` and every value a tune search may give it."""
    check_depth(job.finetune.freeze_depth, blocks, "finetune.freeze_depth")
    domain = job.tune.space.get("finetune.freeze_depth") or {}
    for kind, values in domain.items():
        for value in values:
            check_depth(value, blocks, f"tune.space.finetune.freeze_depth ({kind})")

def check_target_modules(job: JobSpec, names: list[str] | None) -> None:
    """Every ``peft.target_modules`` entry matches a module of the checkpoint (PEFT's suffix rule)."""
    targets = job.peft.target_modules
    if job.peft.method == "none" or not isinstance(targets, list) or not names:
        return
    modules = {n.rsplit(".", 1)[0] for n in names if "." in n} | set(get_task(job.model.task).head_modules)
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    missing = [t for t in targets if t not in leaves and not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        candidates = sorted(leaf for leaf in leaves if not leaf.isdigit())
        raise JobError(
            f"peft.target_modules: {missing} match no module of '{job.model.name}'. Its layers are named "
            f"{', '.join(candidates[:20])}{', ...' if len(candidates) > 20 else ''}; or use 'all-linear', or leave it empty for PEFT's default."
        )

def check_model_files(job: JobSpec) -> ModelFiles:
    """Every model check that needs only its files; returns where they are."""
    files = locate_model(job.model.name, job.model.revision)
    check_architecture(files, job.model.task)
    names = None if job.model.from_scratch else weight_names(files)
    modality = modality_of(job)
    modality.check_model_files(files, job)
    blocks = modality.block_count(files.config)
    if blocks is not None:
        check_freeze_depths(job, blocks)
    check_target_modules(job, names)
    return files
