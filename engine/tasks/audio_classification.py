"""``audio_classification``: a new classifier (projector + classifier) over a speech encoder; accuracy and macro-F1."""

from __future__ import annotations

from typing import Any

from engine.tasks.audio import AudioTask


class AudioClassification(AudioTask):
    """A clip -> one of ``model.labels`` (keyword spotting, speaker or language id, ...)."""

    name = "audio_classification"
    auto_class = "AutoModelForAudioClassification"
    architectures = "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"
    metrics = ("loss", "accuracy", "macro_f1")
    default_metric = "accuracy"
    has_classes = True
    head_modules = ("projector", "classifier")

    def head_names(self, model: Any) -> list[str]:
        """Every present part: the projector and the classifier over it are both new."""
        return [name for name in self.head_modules if hasattr(model, name)]


TASK = AudioClassification()
