"""``sequence_classification``: a new classifier head over a text encoder or decoder; accuracy and macro-F1."""

from __future__ import annotations

from engine.tasks.text import TextTask


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
    masked_lm_source = True


TASK = SequenceClassification()
