"""Preprocessing with the checkpoint's own tokenizer: numpy in, numpy out, no Ray.

``cluster.ingest.datasets`` runs :func:`tokenize_batch` inside Ray Data's ``map_batches``; ``shoulders eval`` and
tests call it directly. Examples are padded to ``max_length`` here and trimmed per training batch by
:func:`trim_batch`, so padding costs nothing in the step.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from engine.preprocessing.labels import IGNORE_INDEX, encode_labels

SAMPLE_ID = "sample_id"
"""Column of integer sample ids kept in the training data when ``data.id_column`` is set (for resume audits)."""


@functools.lru_cache(maxsize=4)
def cached_tokenizer(name: str, revision: str | None = None) -> Any:
    """One tokenizer per process and checkpoint (Ray Data reuses worker processes across batches)."""
    from engine.models.loading import load_tokenizer

    return load_tokenizer(name, revision)


def tokenize_batch(
    batch: dict[str, np.ndarray],
    *,
    tokenizer: Any,
    text_column: str,
    max_length: int,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    labels: list[str] | None = None,
    id_column: str | None = None,
    lm_labels: bool = False,
) -> dict[str, np.ndarray]:
    """Tokenize a batch of rows into fixed-length int arrays.

    Returns ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` where the tokenizer makes them),
    plus ``labels``: class indices from ``label_column`` (classification), or with ``lm_labels`` the input
    ids with padding set to -100 (next-token prediction).
    """
    texts = [str(t) for t in batch[text_column]]
    pairs = [str(t) for t in batch[text_pair_column]] if text_pair_column else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
    out = {key: np.asarray(value, dtype=np.int64) for key, value in encoded.items()}
    if lm_labels:
        out["labels"] = np.where(out["attention_mask"] == 1, out["input_ids"], IGNORE_INDEX)
    elif label_column is not None and labels is not None:
        out["labels"] = encode_labels(batch[label_column], labels)
    if id_column is not None:
        out[SAMPLE_ID] = np.asarray(batch[id_column], dtype=np.int64)
    return out


def trim_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut the padding columns that no example in the batch uses (right padding)."""
    if "input_values" in batch or "input_features" in batch:
        from engine.preprocessing.speech import trim_speech_batch

        return trim_speech_batch(batch)
    from engine.preprocessing.seq2seq import trim_targets

    batch, seq2seq_labels = trim_targets(batch)  # text-to-text targets: cut to their own longest
    mask = batch.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        longest = max(int(mask.sum(axis=1).max()), 1)
        batch = {k: (v[:, :longest] if v.ndim == 2 and v.shape[1] == mask.shape[1] else v) for k, v in batch.items()}
    return batch if seq2seq_labels is None else {**batch, "labels": seq2seq_labels}
