"""``audio_classification``: a new classifier (projector + classifier) over a speech encoder; accuracy and macro-F1."""

from __future__ import annotations

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
    multi_part_head = True


TASK = AudioClassification()
