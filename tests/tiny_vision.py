"""Tiny image models of real architectures (ViT, ResNet, ConvNeXt; random weights) saved with an image
processor, and tiny labelled image sets (an image folder and parquet with PNG bytes), built offline for tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

SIDE = 32
"""Side of the tiny models' input images (their processors resize to it)."""
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}
"""Classes of the tiny image set: the dominant colour of a noisy picture with a bright square in it."""


def _processor(kind: str):
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    if kind == "convnext":  # shortest edge below 384: resized to side / crop_pct, centre-cropped to side
        return ConvNextImageProcessor(size={"shortest_edge": SIDE}, crop_pct=0.875, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return ViTImageProcessor(size={"height": SIDE, "width": SIDE}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def save_tiny_image_model(kind: str, path: Path) -> Path:
    """Save a tiny ``vit`` (2 layers, hidden 32), ``resnet`` (2 stages) or ``convnext`` (2 stages) with its image
    processor to ``path`` (the bare backbone: the engine adds the classifier)."""
    import torch
    import transformers

    if kind == "vit":
        config = transformers.ViTConfig(image_size=SIDE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    elif kind == "resnet":
        config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    elif kind == "convnext":
        config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=4)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config)
    path = Path(path)
    model.save_pretrained(path)
    _processor(kind).save_pretrained(path)
    return path


def colour_image(label: str, rng: np.random.Generator, mode: str = "RGB") -> bytes:
    """PNG bytes of one picture of class ``label``: noise around the class colour, a bright square somewhere."""
    from PIL import Image

    base = np.array(COLOURS[label], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 40, (24, 24, 3)), 0, 255)
    top, left = rng.integers(0, 16, size=2)
    pixels[top:top + 8, left:left + 8] = 255
    image = Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_colour_images(folder: Path, per_class: int = 8, seed: int = 0, layout: str = "parquet") -> dict[str, Path]:
    """Train/validation/test splits of the colour classes: ``parquet`` (columns ``image`` with PNG bytes and
    ``label``) or ``folder`` (``<split>/<label>/<n>.png``). A few training images are grayscale or RGBA, which
    the processor path must convert to RGB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in {"train": per_class, "validation": max(per_class // 2, 1), "test": max(per_class // 2, 1)}.items():
        labels = [label for label in COLOURS for _ in range(n)]
        rng.shuffle(labels)
        modes = ["L" if split == "train" and i % 7 == 3 else "RGBA" if split == "train" and i % 7 == 5 else "RGB" for i in range(len(labels))]
        images = [colour_image(label, rng, mode) for label, mode in zip(labels, modes)]
        if layout == "folder":
            for i, (label, data) in enumerate(zip(labels, images)):
                (folder / split / label).mkdir(parents=True, exist_ok=True)
                (folder / split / label / f"{i}.png").write_bytes(data)
            out[split] = folder / split
        else:
            pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": labels}), folder / f"{split}.parquet")
            out[split] = folder / f"{split}.parquet"
    return out
