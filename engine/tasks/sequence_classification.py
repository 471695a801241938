"""``sequence_classification``: a new classifier head over a text encoder or decoder; accuracy and macro-F1."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.tasks.text import TextTask

if TYPE_CHECKING:
    from engine.config.schema import JobSpec


class SequenceClassification(TextTask):
    """Text (or a text pair) -> one of ``model.labels``."""

    name = "sequence_classification"
    auto_class = "AutoModelForSequenceClassification"
    architectures = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    metrics = ("loss", "accuracy", "macro_f1")
    default_metric = "accuracy"
    has_classes = True
    head_modules = ("classifier", "score")
    peft_task_type = "SEQ_CLS"

    def forgetting_measure(self, job: JobSpec) -> str | None:
        """``mlm_loss`` through the checkpoint's own masked-LM head when it was saved with one (``architectures``
        in its config name a ``*ForMaskedLM``), else ``cka``."""
        if not job.model.from_scratch and any(a.endswith("ForMaskedLM") for a in checkpoint_architectures(job)):
            return "mlm_loss"
        return "cka"


def checkpoint_architectures(job: JobSpec) -> list[str]:
    """``architectures`` of the checkpoint's ``config.json`` (empty when it cannot be read)."""
    from engine.errors import JobError
    from engine.models.loading import read_config_json

    try:
        return list(read_config_json(job.model.name, job.model.revision).get("architectures") or [])
    except JobError:
        return []


TASK = SequenceClassification()
