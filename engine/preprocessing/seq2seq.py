"""Text-to-text (``model.task: seq2seq``: T5, BART, mT5): a source column in, a target column as labels.

numpy in, numpy out, no Ray. The source (``data.prompt_column``) goes to the encoder; the target
(``data.completion_column``), tokenized by the same tokenizer with its EOS, becomes ``labels`` (-100 on
padding); the model builds its decoder inputs from them. Evaluation generates greedily, as Whisper does
(``engine.evaluation.answers``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.preprocessing.chat import IGNORE_INDEX, TRUNCATED

TARGET_MASK = "target_mask"
"""Padding mask of the targets, used only to trim ``labels`` per batch (``engine.preprocessing.text.trim_batch``)."""


def encode_pairs(
    batch: dict[str, np.ndarray], *, tokenizer: Any, columns: dict[str, str], max_length: int,
    mark_truncated: bool = False, id_column: str | None = None, **_: Any,
) -> dict[str, np.ndarray]:
    """Tokenize source/target pairs into ``input_ids``, ``attention_mask`` and ``labels`` (each padded to
    ``max_length``), plus ``target_mask`` for trimming and ``truncated`` (1 where a side was cut) when asked."""
    sources = [str(s) for s in batch[columns["prompt"]]]
    targets = [str(t) for t in batch[columns["completion"]]]
    source = tokenizer(sources, truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
    target = tokenizer(targets, truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
    target_mask = np.asarray(target["attention_mask"], dtype=np.int64)
    out = {
        "input_ids": np.asarray(source["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(source["attention_mask"], dtype=np.int64),
        "labels": np.where(target_mask == 1, np.asarray(target["input_ids"], dtype=np.int64), IGNORE_INDEX),
        TARGET_MASK: target_mask,
    }
    if mark_truncated:
        full = [len(ids) for ids in tokenizer(sources)["input_ids"]], [len(ids) for ids in tokenizer(targets)["input_ids"]]
        out[TRUNCATED] = np.array([int(s > max_length or t > max_length) for s, t in zip(*full)], dtype=np.int64)
    if id_column is not None:
        out["sample_id"] = np.asarray(batch[id_column], dtype=np.int64)
    return out


def trim_targets(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Take ``labels`` out of a seq2seq batch, cut to its longest target (None for other batches)."""
    if TARGET_MASK not in batch:
        return batch, None
    rest = dict(batch)
    mask, labels = rest.pop(TARGET_MASK), rest.pop("labels")
    return rest, np.ascontiguousarray(labels[:, : max(int(mask.sum(axis=1).max()), 1)])
