"""Driver-side checks of image jobs before any worker starts: the checkpoint's image processor and the job's
size and normalisation against it, and a decode of sampled images.

A preprocessing mismatch fails silently (accuracy just drops), so a size or normalisation that contradicts the
checkpoint's processor is refused unless the job says ``data.preprocessing_override: true``. Every row's image is
opened by the row rules (``cluster.ingest.rows``: before the run on the sampled rows, then while streaming);
here the first images of each split are also fully decoded and converted to RGB, as training will.
"""

from __future__ import annotations

from typing import Any

from cluster.ingest.rows import iter_column
from engine.config.schema import JobSpec
from engine.errors import JobError
from engine.tasks import get_task

SAMPLE_FILES = 8
DECODE_ROWS = 32
"""Images per file (of the first :data:`SAMPLE_FILES` of a split) fully decoded before the run (all rows' images are opened and verified by the row rules)."""


def check_images(job: JobSpec, splits: dict[str, Any], base_dir_of: Any) -> None:
    """The job's preprocessing against the checkpoint's processor; the first :data:`DECODE_ROWS` images of each split decode.

    Raises:
        JobError: a contradicting setting (naming both values), or an image that cannot be decoded (naming it, its file and row).
    """
    from engine.preprocessing.image import ImageError, decode_image

    get_task(job.model.task).check_settings(job)
    column = job.data.image_column
    for split in splits.values():
        base_dir = base_dir_of(split)
        for path in [f for f in split.files if "://" not in f][:SAMPLE_FILES]:
            for row, value in enumerate(iter_column([path], split.format, column), start=1):
                if row > DECODE_ROWS:
                    break
                if value is None:
                    continue  # the row rules name null images
                try:
                    decode_image(value, base_dir)
                except ImageError as exc:
                    raise JobError(
                        f"data.{split.name}: file '{path}', row {row} (counting data rows from 1): column '{column}': {exc}. "
                        "Fix or remove the image, or set data.bad_rows: skip to drop and count such rows."
                    ) from None
