"""Image checkpoints: their image processor, read from the checkpoint's own ``preprocessor_config.json``.

The processor decides what the model was pre-trained on (input size, crop, normalisation constants), so a
job that asks for another size or normalisation is refused unless it says so (``data.preprocessing_override``).
:func:`image_processor_settings` and :func:`check_image_preprocessing` are torch-free, for the driver's checks
before any worker starts.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from engine.errors import JobError

log = logging.getLogger(__name__)
PREPROCESSOR_FILE = "preprocessor_config.json"


def image_processor_settings(name: str, revision: str | None = None) -> dict[str, Any]:
    """The checkpoint's ``preprocessor_config.json`` (size, crop, mean, std, ...) without torch.

    Raises:
        JobError: the checkpoint ships no image processor, so its input size and normalisation are unknown.
    """
    path = Path(name).expanduser() / PREPROCESSOR_FILE
    try:
        if not path.parent.is_dir():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(name, PREPROCESSOR_FILE, revision=revision))
        return json.loads(path.read_text())
    except Exception as exc:  # missing file, bad JSON or a hub error: the same for the user
        raise JobError(
            f"model.name '{name}' has no readable {PREPROCESSOR_FILE} ({str(exc).splitlines()[0]}); an image task needs the "
            "checkpoint's image processor (size, crop, normalisation). Save it beside the model with "
            "image_processor.save_pretrained(folder)."
        ) from None


def input_size(settings: dict[str, Any]) -> int | tuple[int, int] | None:
    """The side (or height, width) of the images the model sees: the crop when the processor crops, else its size."""
    size = settings.get("crop_size") if settings.get("do_center_crop") and settings.get("crop_size") else settings.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if size.get("height") and size.get("width"):
            return size["height"] if size["height"] == size["width"] else (size["height"], size["width"])
        return size.get("shortest_edge")
    return None


def _rounded(values: Any) -> list[float] | None:
    return [round(float(v), 4) for v in values] if isinstance(values, (list, tuple)) else None


def preprocessing_overrides(job: Any) -> dict[str, Any]:
    """The job's ``data.image_size`` / ``image_mean`` / ``image_std`` that are set, by key."""
    data = job.data
    found = {"image_size": data.image_size, "image_mean": data.image_mean, "image_std": data.image_std}
    return {key: value for key, value in found.items() if value is not None}


def check_image_preprocessing(job: Any) -> dict[str, Any]:
    """Refuse a size or normalisation that contradicts the checkpoint's processor (unless
    ``data.preprocessing_override`` says so); return the processor's settings.

    Raises:
        JobError: naming the job's value, the checkpoint's, and the two ways out.
    """
    settings = image_processor_settings(job.model.name, job.model.revision)
    checkpoint = {
        "image_size": input_size(settings),
        "image_mean": _rounded(settings.get("image_mean")) if settings.get("do_normalize", True) else None,
        "image_std": _rounded(settings.get("image_std")) if settings.get("do_normalize", True) else None,
    }
    for key, value in preprocessing_overrides(job).items():
        theirs = checkpoint[key]
        ours = value if key == "image_size" else _rounded(value)
        if theirs is None or ours == theirs:
            continue
        if job.data.preprocessing_override:
            log.warning("data.%s is %s, not the checkpoint's %s (data.preprocessing_override: true)", key, ours, theirs)
            continue
        raise JobError(
            f"data.{key} is {ours} but the checkpoint '{job.model.name}' was pre-trained with {theirs} (its {PREPROCESSOR_FILE}); "
            f"the model would see inputs unlike its pre-training. Remove data.{key} to use {theirs}, or set "
            "data.preprocessing_override: true to train with yours (the export keeps it)."
        )
    return settings


@functools.lru_cache(maxsize=4)
def _load_processor(name: str, revision: str | None) -> Any:
    from transformers import AutoImageProcessor

    from engine.checkpoints.storage import preprocessing_source

    return AutoImageProcessor.from_pretrained(preprocessing_source(name), revision=revision)


def load_image_processor(name: str, revision: str | None = None, *, image_size: int | None = None,
                         image_mean: tuple[float, ...] | None = None, image_std: tuple[float, ...] | None = None) -> Any:
    """The checkpoint's own image processor (one per process and checkpoint), with the job's overrides applied
    to a copy: ``image_size`` resizes (and crops) to that side, ``image_mean``/``image_std`` normalise."""
    processor = _load_processor(name, revision)
    if image_size is None and image_mean is None and image_std is None:
        return processor
    import copy

    processor = copy.deepcopy(processor)
    if image_size is not None:
        size = processor.size if isinstance(processor.size, dict) else dict(vars(processor.size))
        if size.get("height") or size.get("width"):
            processor.size = {"height": image_size, "width": image_size}
        else:
            processor.size = {"shortest_edge": image_size}
        if getattr(processor, "crop_size", None) is not None:
            processor.crop_size = {"height": image_size, "width": image_size}
    if image_mean is not None:
        processor.image_mean = list(image_mean)
    if image_std is not None:
        processor.image_std = list(image_std)
    return processor


def job_image_processor(job: Any, source: str | None = None) -> Any:
    """The processor a job's images go through: the checkpoint's (or ``source``'s, an export that saved the
    job's) with the job's overrides; an export already holds them, so none are applied to it."""
    if source is not None and source != job.model.name:
        return load_image_processor(source)
    data = job.data
    return load_image_processor(
        job.model.name, job.model.revision, image_size=data.image_size,
        image_mean=tuple(data.image_mean) if data.image_mean else None, image_std=tuple(data.image_std) if data.image_std else None,
    )
