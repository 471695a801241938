"""Speech preprocessing with the checkpoint's own feature extractor: numpy in, numpy out, no Ray.

``cluster.ingest.datasets`` runs :func:`featurize_batch` inside Ray Data's ``map_batches``. Each batch (one Ray
Data block) is decoded, resampled to the checkpoint's rate, featurised, and sorted by clip length, so
the loop's small shuffle buffer draws neighbours of similar length: training batches are length-grouped
and :func:`trim_speech_batch` cuts them to their longest clip.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.preprocessing.audio import load_clip
from engine.preprocessing.labels import IGNORE_INDEX, encode_labels

PADDING_MASK = "padding_mask"
"""Key of the mask kept only for trimming, for checkpoints whose models take no attention mask
(wav2vec2-base style: ``return_attention_mask: false`` in the feature extractor); dropped before the model."""


def uses_spectrogram(feature_extractor: Any) -> bool:
    """Whether the checkpoint's model takes a fixed window of log-mel features (Whisper) instead of raw samples."""
    return "input_features" in getattr(feature_extractor, "model_input_names", ())


def encode_transcripts(texts: list[str], tokenizer: Any, max_length: int, strip_token_id: int | None = None) -> np.ndarray:
    """Transcripts -> label ids padded with -100 to ``max_length`` (Whisper: with its prefix tokens).

    ``strip_token_id`` (the decoder start token) is removed from the front: the model prepends it again
    when it shifts the labels right.
    """
    out = np.full((len(texts), max_length), IGNORE_INDEX, dtype=np.int64)
    for i, ids in enumerate(tokenizer(texts).input_ids):
        if strip_token_id is not None and ids and ids[0] == strip_token_id:
            ids = ids[1:]
        ids = ids[:max_length]
        out[i, : len(ids)] = ids
    return out


def featurize_batch(
    batch: dict[str, np.ndarray],
    *,
    feature_extractor: Any,
    audio_column: str,
    max_seconds: float,
    allow_resample: bool = True,
    base_dir: str | None = None,
    label_column: str | None = None,
    labels: list[str] | None = None,
    transcript_column: str | None = None,
    tokenizer: Any = None,
    max_label_length: int = 128,
    decoder_start_token_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Decode, resample and featurise a batch of clips; add the task's labels; sort rows by clip length.

    Returns ``input_values`` (+ ``attention_mask`` or :data:`PADDING_MASK`) padded to ``max_seconds``,
    or Whisper's ``input_features``; and ``labels``: class indices, or transcript ids padded with -100.
    """
    rate = int(feature_extractor.sampling_rate)
    clips = [load_clip(v, rate, allow_resample=allow_resample, max_seconds=max_seconds, base_dir=base_dir) for v in batch[audio_column]]
    order = np.argsort([len(c) for c in clips], kind="stable")
    clips = [clips[i] for i in order]
    if uses_spectrogram(feature_extractor):
        encoded = feature_extractor(clips, sampling_rate=rate, return_tensors="np")
        out = {"input_features": np.asarray(encoded["input_features"], dtype=np.float32)}
    else:
        encoded = feature_extractor(
            clips, sampling_rate=rate, padding="max_length", max_length=int(max_seconds * rate), truncation=True,
            return_attention_mask=True, return_tensors="np",
        )
        mask_key = "attention_mask" if getattr(feature_extractor, "return_attention_mask", False) else PADDING_MASK
        out = {"input_values": np.asarray(encoded["input_values"], dtype=np.float32), mask_key: np.asarray(encoded["attention_mask"], dtype=np.int64)}
    if label_column is not None and labels is not None:  # classes
        out["labels"] = encode_labels(batch[label_column][order], labels)
    elif transcript_column is not None:  # speech recognition
        texts = [str(batch[transcript_column][i]).strip() for i in order]
        out["labels"] = encode_transcripts(texts, tokenizer, max_label_length, decoder_start_token_id)
    return out


def trim_speech_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut a speech batch to its longest clip and longest transcript; drop the trimming-only mask.

    Whisper's ``input_features`` keep their fixed window (the model requires it).
    """
    out = dict(batch)
    mask_key = "attention_mask" if "attention_mask" in out else PADDING_MASK if PADDING_MASK in out else None
    if mask_key and "input_values" in out:
        mask = out[mask_key]
        longest = max(int(mask.sum(axis=1).max()), 1)
        out["input_values"], out[mask_key] = out["input_values"][:, :longest], mask[:, :longest]
    out.pop(PADDING_MASK, None)
    target = out.get("labels")
    if target is not None and target.ndim == 2:
        used = np.flatnonzero((target != IGNORE_INDEX).any(axis=0))
        out["labels"] = target[:, : int(used[-1]) + 1 if used.size else 1]
    return out
