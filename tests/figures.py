"""Checks that a PNG figure was drawn: its size in pixels, and coloured marks on it (not a blank canvas)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPORT_DPI = 110
"""The resolution ``cluster.run.report_files.save_fig`` writes figures at."""


def figure_pixels(figsize: tuple[float, float], dpi: int = REPORT_DPI) -> tuple[int, int]:
    """(width, height) in pixels of a matplotlib figure of ``figsize`` inches saved at ``dpi``."""
    return int(round(figsize[0] * dpi, 6)), int(round(figsize[1] * dpi, 6))  # matplotlib truncates


def assert_drawn_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """``path`` is a PNG of ``size`` (width, height) pixels with more than one colour, some of it
    saturated (curves and points are drawn in colour; axes, ticks and text are grey). Returns the RGB pixels."""
    from matplotlib.image import imread

    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    rgb = imread(path)[..., :3]
    assert (rgb.shape[1], rgb.shape[0]) == size, f"{path}: {rgb.shape[1]}x{rgb.shape[0]} pixels, expected {size[0]}x{size[1]}"
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 1, f"{path} is blank"
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert (saturation > 0.3).sum() > 50, f"{path} has no coloured marks: nothing was plotted"
    return rgb
