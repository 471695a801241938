"""The image modality's share of the task protocol: images decoded and transformed by the checkpoint's own
image processor, augmented on the worker during training.

:func:`process_rows` is what Ray Data maps (module-level, so it pickles); decoding, RGB conversion and the
processor call are ``engine.preprocessing.image``'s, the processor and the override check
``engine.models.vision``'s. :meth:`ImageTask.train_augmentation` is the seeded random resized crop and flip
the loop applies to training batches only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.tasks.base import Task

if TYPE_CHECKING:
    from engine.config.schema import JobSpec


def process_rows(batch: dict[str, np.ndarray], model_name: str, revision: str | None, source: str | None,
                 overrides: dict[str, Any], **kwargs: Any) -> dict[str, np.ndarray]:
    """:func:`engine.preprocessing.image.process_batch` with the checkpoint's image processor (and the job's overrides)."""
    from engine.models.vision import load_image_processor
    from engine.preprocessing.image import process_batch

    processor = load_image_processor(source) if source else load_image_processor(model_name, revision, **overrides)
    return process_batch(batch, processor=processor, **kwargs)


def augment_pixels(batch: dict[str, Any], rng: np.random.Generator, crop_scale: tuple[float, float] | None,
                   hflip: bool) -> dict[str, Any]:
    """A training batch with its ``pixel_values`` augmented (``engine.preprocessing.image.augment_batch``)."""
    from engine.preprocessing.image import PIXEL_VALUES, augment_batch

    out = dict(batch)
    pixels = np.asarray(batch[PIXEL_VALUES])
    out[PIXEL_VALUES] = augment_batch(pixels, rng, crop_scale=crop_scale, hflip=hflip)
    return out


class ImageTask(Task):
    """A task on images read by the checkpoint's own image processor (``data.image_column``: paths relative
    to the data's folder, the encoded files' bytes, or ``{bytes, path}`` structs)."""

    modality = "image"

    def required_columns(self, job: JobSpec) -> list[str]:
        """``image_column`` and ``label_column``."""
        return ["image_column", "label_column"]

    def forgetting_measure(self, job: JobSpec) -> str | None:
        """None: retention sets are text, so no retention measure applies to an image model."""
        return None

    def check_settings(self, job: JobSpec) -> None:
        """Image size and normalisation agree with the checkpoint's processor (or the job opts out).

        Raises:
            engine.errors.JobError: naming the job's value and the checkpoint's.
        """
        from engine.models.vision import check_image_preprocessing

        check_image_preprocessing(job)

    def batch_preprocessor(self, job: JobSpec, labels: list[str] | None, *, source: str | None = None, keep_ids: bool = False,
                           base_dir: str | None = None) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """Decode, convert to RGB, resize, crop and normalise with the checkpoint's processor; only model inputs remain.

        ``source``: an exported model folder whose processor (with the job's overrides saved in it) is used instead.
        """
        data = job.data
        overrides = {
            "image_size": data.image_size,
            "image_mean": tuple(data.image_mean) if data.image_mean else None,
            "image_std": tuple(data.image_std) if data.image_std else None,
        }
        return functools.partial(
            process_rows, model_name=job.model.name, revision=job.model.revision,
            source=source if source and source != job.model.name else None, overrides=overrides,
            image_column=data.image_column, base_dir=base_dir,
            label_column=data.label_column, labels=labels,
        )

    def train_augmentation(self, job: JobSpec) -> Callable[[dict[str, Any], np.random.Generator], dict[str, Any]] | None:
        """Random resized crop (``data.crop_scale``) and horizontal flip (``data.hflip``) of training batches;
        None with ``data.augment: false``."""
        data = job.data
        if not data.augment:
            return None
        return functools.partial(augment_pixels, crop_scale=tuple(data.crop_scale), hflip=data.hflip)

    def preprocessors(self, job: JobSpec) -> tuple[list[Any], int | None]:
        """The checkpoint's image processor with the job's overrides (the export keeps it); no pad id."""
        from engine.models.vision import job_image_processor

        return [job_image_processor(job)], None
