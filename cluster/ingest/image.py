"""Ray Data ingest of images: parquet/Arrow with image bytes (or paths), Hugging Face image datasets, and the
image-folder layout (``<split>/<label>/*.png|jpg``, read through a manifest of paths and labels).

Decoding, RGB conversion, resizing, cropping and normalisation run inside ``map_batches`` on the data CPUs
with the checkpoint's own image processor (the task's ``batch_preprocessor``:
:func:`engine.preprocessing.image.process_batch`); the workers only augment training batches. Relative image
paths are relative to the data file's folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import ray.data

from cluster.ingest.read import read_split, train_and_validation
from cluster.ingest.rows import RowRules
from cluster.ingest.splits import DataInfo, SplitInfo
from engine.config.schema import JobSpec
from engine.errors import JobError
from engine.tasks import get_task

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MANIFEST_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shoulders" / "image-manifests"
"""Where the manifests of image folders are written (one parquet file per folder and content)."""


def data_dir(split: SplitInfo) -> str | None:
    """The folder relative image paths of a split are resolved against (its first data file's folder)."""
    return os.path.dirname(split.files[0]) if split.files and "://" not in split.files[0] else None


def folder_images(root: Path) -> list[Path]:
    """The images of an image folder: ``<root>/<label>/**/<image>``, sorted."""
    return sorted(p for p in root.glob("*/**/*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def folder_manifest(root: str, key: str, image_column: str, label_column: str) -> str | None:
    """A parquet manifest (absolute image path, label = the image's first folder under ``root``) of an image
    folder, or None when ``root`` is not one (not a local folder, or it holds data files or no images).

    Written once per folder content (the manifest's name hashes every path, size and modification time).

    Raises:
        JobError: images placed directly in ``root`` (no label folder).
    """
    from cluster.ingest.splits import EXTENSIONS

    folder = Path(os.path.expanduser(root.removeprefix("file://")))
    if "://" in root.removeprefix("file://") or not folder.is_dir() or any(p.suffix.lower() in EXTENSIONS for p in folder.rglob("*")):
        return None
    images = folder_images(folder)
    loose = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise JobError(f"{key}: '{root}' holds images directly ({loose[0].name}, ...); the image-folder layout is "
                       f"{root}/<label>/<image>: put each image in the folder of its class.")
    if not images:
        return None
    digest = hashlib.sha1()
    for path in images:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    manifest = MANIFEST_DIR / f"{folder.name}-{digest.hexdigest()[:16]}.parquet"
    if not manifest.is_file():
        import pyarrow as pa
        import pyarrow.parquet as pq

        manifest.parent.mkdir(parents=True, exist_ok=True)
        labels = [path.relative_to(folder).parts[0] for path in images]
        from engine.checkpoints.atomic import atomic_path

        with atomic_path(manifest) as tmp:
            pq.write_table(pa.table({image_column: [str(p.resolve()) for p in images], label_column: labels}), tmp, row_group_size=256)
    return str(manifest)


def process(ds: ray.data.Dataset, job: JobSpec, labels: list[str] | None, base_dir: str | None, source: str | None = None) -> ray.data.Dataset:
    """Decode and transform ``ds`` with the checkpoint's image processor (``source``: an export's); only model inputs remain."""
    fn = get_task(job.model.task).batch_preprocessor(job, labels, source=source, base_dir=base_dir)
    return ds.map_batches(fn, batch_format="numpy", batch_size=job.data.rows_per_block)


def build_image_datasets(job: JobSpec, info: DataInfo, rules: dict[str, RowRules]) -> tuple[dict[str, ray.data.Dataset], int]:
    """The processed ``train`` and ``validation`` datasets of an image job, and the number of training rows.

    Without a validation split, ``data.validation_fraction`` of the training rows are held out by a stable hash
    of their image value (its path or bytes)."""
    raw, num_train_rows = train_and_validation(
        info, rules, job.seed, job.data.validation_fraction, job.data.image_column,
        read=lambda split, split_rules, seed: read_split(split, job.data.rows_per_block, shuffle_seed=seed, rules=split_rules), folder=data_dir,
    )
    return {name: process(ds, job, info.labels, folder) for name, (ds, folder) in raw.items()}, num_train_rows


def build_image_eval_dataset(job: JobSpec, split: SplitInfo, labels: list[str] | None, source: str, rules: RowRules) -> ray.data.Dataset:
    """A processed dataset for evaluating a finished model (its image processor in ``source``) on ``split``."""
    return process(read_split(split, job.data.rows_per_block, rules=rules), job, labels, data_dir(split), source=source)
