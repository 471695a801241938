"""What a modality (the kind of input a model reads: text, audio, image) is on the driver, one object per modality.

``cluster/`` asks the job's modality instead of comparing names: which columns a split must have, what makes a
row bad, which of the checkpoint's files must be there, how many blocks ``finetune.freeze_depth`` counts, what
the preflight samples, how a split is read, decoded and preprocessed with Ray Data. Adding a modality is one
module here that defines ``MODALITY`` and one line in :data:`MODALITY_MODULES`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from engine.tasks import get_task

if TYPE_CHECKING:
    from cluster.modalities.base import Modality
    from engine.config.schema import JobSpec

MODALITY_MODULES: dict[str, str] = {
    "text": "cluster.modalities.text",
    "audio": "cluster.modalities.audio",
    "image": "cluster.modalities.image",
}
"""A task's ``modality`` -> the module that defines its driver side (its ``MODALITY``)."""

_LOADED: dict[str, Modality] = {}


def modality_of(job: JobSpec) -> Modality:
    """The driver-side modality object of a job's task."""
    name = get_task(job.model.task).modality
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(MODALITY_MODULES[name]).MODALITY
    return _LOADED[name]
