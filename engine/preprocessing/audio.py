"""Audio decoding: files or bytes in, mono float32 numpy at the checkpoint's rate out. No Ray, no torch.

Decoding is ``soundfile`` (wav, flac, ogg, ...), resampling is ``soxr`` (high quality), channels are
averaged to mono (speech checkpoints take one channel). A clip at another rate than the checkpoint's is
resampled, or refused with both rates named when the job says ``data.resample: false``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from engine.preprocessing.datafiles import media_source

log = logging.getLogger(__name__)
_logged_rates: set[tuple[int, int]] = set()


class SamplingRateError(ValueError):
    """Audio at another sampling rate than the checkpoint's, with resampling turned off."""


def _source(value: Any, base_dir: str | None) -> Any:
    """What the decoder opens for a column value (:func:`engine.preprocessing.datafiles.media_source`)."""
    return media_source(value, base_dir, "audio")


def audio_rate(value: Any, base_dir: str | None = None) -> int:
    """The sampling rate of one clip, from its header only."""
    return audio_info(value, base_dir)[0]


def audio_info(value: Any, base_dir: str | None = None) -> tuple[int, int]:
    """(sampling rate, frames) of one clip, from its header only."""
    import soundfile as sf

    info = sf.info(_source(value, base_dir))
    return int(info.samplerate), int(info.frames)


def decode(value: Any, base_dir: str | None = None) -> tuple[np.ndarray, int]:
    """Decode one clip to (float32 samples, rate); multi-channel audio is averaged to mono."""
    import soundfile as sf

    samples, rate = sf.read(_source(value, base_dir), dtype="float32", always_2d=True)
    return samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0], int(rate)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample with soxr (high quality); the same array when the rates already match."""
    if from_rate == to_rate:
        return samples
    import soxr

    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def check_rate(from_rate: int, to_rate: int, allow_resample: bool, where: str = "audio") -> None:
    """Refuse a rate mismatch when resampling is off; log each (from, to) pair once per process otherwise."""
    if from_rate == to_rate:
        return
    if not allow_resample:
        raise SamplingRateError(
            f"{where} is sampled at {from_rate} Hz but the checkpoint expects {to_rate} Hz and data.resample is false. "
            f"Set data.resample: true to resample {from_rate} Hz -> {to_rate} Hz, or give audio at {to_rate} Hz."
        )
    if (from_rate, to_rate) not in _logged_rates:
        _logged_rates.add((from_rate, to_rate))
        log.info("%s: resampling %d Hz -> %d Hz (the checkpoint's rate) with soxr", where, from_rate, to_rate)


def load_clip(value: Any, rate: int, *, allow_resample: bool = True, max_seconds: float | None = None, base_dir: str | None = None) -> np.ndarray:
    """One clip as mono float32 at ``rate``, cut to ``max_seconds``."""
    samples, found = decode(value, base_dir)
    check_rate(found, rate, allow_resample, where=f"audio '{value}'" if isinstance(value, str) else "audio")
    samples = resample(samples, found, rate)
    if max_seconds:
        samples = samples[: int(max_seconds * rate)]
    return samples
