"""Image preprocessing with the checkpoint's own image processor: numpy in, numpy out, no Ray, no torch.

Ray Data maps :func:`process_batch` over the rows: each image (a file path relative to the data's folder,
the encoded file's bytes, or a ``{bytes, path}`` struct as Hugging Face datasets write to parquet) is
decoded with Pillow, converted to RGB as ``transformers``' processors expect (grayscale replicated, an alpha
channel composited on white), and resized, cropped and normalised by the checkpoint's processor.

Training augmentation (:func:`augment_batch`: a random resized crop and a horizontal flip) runs on the
worker, on the processed ``pixel_values``, with a generator the loop seeds from the job's seed and the
batch's position in the epoch, so a resumed run draws exactly the same crops. Resizing and flipping commute
with the per-channel normalisation, so augmenting the normalised arrays equals augmenting the pixels.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from engine.preprocessing.datafiles import media_source
from engine.preprocessing.labels import encode_labels

PIXEL_VALUES = "pixel_values"
"""The model input every ``AutoModelForImageClassification`` takes."""


class ImageError(ValueError):
    """An image that cannot be decoded (missing, unreadable, empty); the message names it."""


def describe(value: Any) -> str:
    """How messages name an image value: its path, or ``<N bytes>``."""
    if isinstance(value, dict):
        return str(value.get("path")) if value.get("path") else describe(value.get("bytes"))
    if isinstance(value, (bytes, bytearray, memoryview, np.ndarray)):
        return f"<{len(value)} bytes>"
    return str(value)[:200]


def _source(value: Any, base_dir: str | None) -> Any:
    """What the decoder opens for a column value (:func:`engine.preprocessing.datafiles.media_source`)."""
    return media_source(value, base_dir, "image", ImageError, describe(value))


def _reason(exc: BaseException) -> str:
    """An exception of Pillow's as a short reason (without the address of an in-memory file)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow reads"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def decode_image(value: Any, base_dir: str | None = None) -> Any:
    """Decode one image fully (a truncated file fails here, not later) as a Pillow image in RGB.

    Raises:
        ImageError: a missing, empty or unreadable image, naming it and why.
    """
    from PIL import Image, UnidentifiedImageError

    source = _source(value, base_dir)
    if isinstance(source, io.BytesIO) and not source.getbuffer().nbytes:
        raise ImageError(f"image {describe(value)} is empty (0 bytes)")
    if isinstance(source, str) and os.path.isfile(source) and os.path.getsize(source) == 0:
        raise ImageError(f"image '{source}' is empty (0 bytes)")
    try:
        with Image.open(source) as image:
            image.load()
            return to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        where = source if isinstance(source, str) else describe(value)
        raise ImageError(f"image {where!r} cannot be decoded ({_reason(exc)})") from None


def image_problem(value: Any, base_dir: str | None = None) -> str | None:
    """Why one image value cannot be used (missing, empty, not an image), or None. Cheap: Pillow reads the
    header and verifies the file's structure (PNG checksums) without decoding the pixels, so the row checks
    can run on every streamed row; a file damaged past that fails at decoding, naming the image."""
    from PIL import Image, UnidentifiedImageError

    try:
        source = _source(value, base_dir)
    except ImageError as exc:
        return str(exc)
    if isinstance(source, io.BytesIO) and not source.getbuffer().nbytes:
        return f"image {describe(value)} is empty (0 bytes)"
    if isinstance(source, str):
        if not os.path.isfile(source):
            return f"image '{source}' does not exist" + (" (relative paths are relative to the data file's folder)" if base_dir else "")
        if os.path.getsize(source) == 0:
            return f"image '{source}' is empty (0 bytes)"
    try:
        with Image.open(source) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        where = source if isinstance(source, str) else describe(value)
        return f"image {where!r} is not a readable image ({_reason(exc)})"
    return None


def to_rgb(image: Any) -> Any:
    """Three channels as ImageNet checkpoints expect: grayscale replicated, transparency composited on white
    (as ``transformers.image_transforms.convert_to_rgb`` does), palette and CMYK images converted."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale to 8 bits before replicating
        array = np.asarray(image, dtype=np.float64)
        peak = max(float(array.max()), 1.0)
        image = Image.fromarray((array * (255.0 / (65535.0 if peak > 255 else 255.0))).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def process_batch(
    batch: dict[str, np.ndarray],
    *,
    processor: Any,
    image_column: str,
    base_dir: str | None = None,
    label_column: str | None = None,
    labels: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Decode a batch of images and apply the checkpoint's processor; add class indices as ``labels``.

    Returns ``pixel_values`` (float32, N x 3 x H x W, as the processor resizes, crops and normalises) and,
    with ``label_column``, ``labels``.

    Raises:
        ImageError: an image that cannot be decoded, naming it.
    """
    images = [decode_image(value, base_dir) for value in batch[image_column]]
    encoded = processor(images=images, return_tensors="np")
    out = {PIXEL_VALUES: np.ascontiguousarray(encoded[PIXEL_VALUES], dtype=np.float32)}
    if label_column is not None and labels is not None:
        out["labels"] = encode_labels(batch[label_column], labels)
    return out


def random_resized_box(height: int, width: int, rng: np.random.Generator, scale: tuple[float, float],
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering ``scale`` of the area at an aspect ratio in ``ratio`` (torchvision's
    ``RandomResizedCrop`` rule: ten tries, then the largest centred crop that fits the ratio range)."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of a C x H x W array (half-pixel centres, edges clamped, as ``F.interpolate(align_corners=False)``)."""
    _, in_h, in_w = image.shape

    def grid(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        low = np.floor(pos).astype(np.int64)
        return low, np.minimum(low + 1, n_in - 1), (pos - low).astype(image.dtype)

    y0, y1, wy = grid(out_h, in_h)
    x0, x1, wx = grid(out_w, in_w)
    rows = image[:, y0, :] * (1 - wy)[None, :, None] + image[:, y1, :] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def augment_batch(pixel_values: np.ndarray, rng: np.random.Generator, *, crop_scale: tuple[float, float] | None = (0.08, 1.0),
                  hflip: bool = True) -> np.ndarray:
    """Training augmentation of processed images: a random resized crop back to the input size (``crop_scale``
    of the area; None: no crop) and a horizontal flip with probability 1/2. Draws come from ``rng`` in a fixed
    order (crop, then flip, image by image), so a seeded generator reproduces the batch exactly."""
    out = np.empty_like(pixel_values)
    _, _, height, width = pixel_values.shape
    for i, image in enumerate(pixel_values):
        if crop_scale is not None:
            top, left, h, w = random_resized_box(height, width, rng, crop_scale)
            image = resize_bilinear(image[:, top:top + h, left:left + w], height, width)
        if hflip and rng.random() < 0.5:
            image = image[:, :, ::-1]
        out[i] = image
    return out
