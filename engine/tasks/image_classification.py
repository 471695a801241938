"""``image_classification``: a new classifier head over an image backbone (ViT, ResNet, ConvNeXt, EfficientNet,
Swin, DINOv2, ...); accuracy and macro-F1."""

from __future__ import annotations

from engine.tasks.image import ImageTask


class ImageClassification(ImageTask):
    """An image -> one of ``model.labels``."""

    name = "image_classification"
    auto_class = "AutoModelForImageClassification"
    architectures = "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"
    metrics = ("loss", "accuracy", "macro_f1")
    default_metric = "accuracy"
    head_modules = ("classifier",)


TASK = ImageClassification()
