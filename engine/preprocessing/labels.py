"""Targets shared by every modality: the ignored label id and class names as indices. numpy only."""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
"""Label id the losses skip (padding, prompt tokens)."""


def encode_labels(values: np.ndarray, labels: list[str]) -> np.ndarray:
    """Class names (or integer indices) -> int64 indices into ``labels``.

    Raises:
        ValueError: a value that is not a declared class, naming it.
    """
    index = {label: i for i, label in enumerate(labels)}
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        key = value.item() if isinstance(value, np.generic) else value
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and str(key) not in index:
            if not 0 <= key < len(labels):
                raise ValueError(f"label index {key} is outside 0..{len(labels) - 1}")
            out[i] = key
            continue
        if str(key) not in index:
            raise ValueError(f"label '{key}' is not one of the job's labels {labels}")
        out[i] = index[str(key)]
    return out
