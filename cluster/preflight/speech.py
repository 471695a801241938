"""Driver-side checks of speech jobs before any worker starts: columns, sampling rates, feature options, vocabulary.

Preprocessing must match the checkpoint, and a mismatch fails silently (accuracy just drops), so these
checks refuse what they can: a feature option that contradicts the checkpoint's feature extractor, or
audio at another rate when ``data.resample`` is false. Audio at another rate is otherwise resampled, and
that is logged once with both rates.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from engine.config.schema import JobSpec
from engine.errors import JobError
from engine.tasks import get_task

log = logging.getLogger(__name__)
PROBE_ROWS = 256
"""Clips per split whose headers are read: readable, not empty, and at which sampling rate(s)."""


def check_feature_options(job: JobSpec) -> dict[str, Any]:
    """Refuse feature options that contradict the checkpoint's feature extractor; return its settings."""
    from engine.models.speech import preprocessor_settings

    settings = preprocessor_settings(job.model.name, job.model.revision)
    rate = settings.get("sampling_rate")
    if job.data.sampling_rate is not None and rate and job.data.sampling_rate != rate:
        raise JobError(
            f"data.sampling_rate is {job.data.sampling_rate} Hz but the checkpoint '{job.model.name}' was trained on "
            f"{rate} Hz audio (its feature extractor). Remove data.sampling_rate; audio at other rates is resampled to {rate} Hz."
        )
    if job.data.normalize is not None and "do_normalize" in settings and bool(settings["do_normalize"]) != job.data.normalize:
        raise JobError(
            f"data.normalize is {str(job.data.normalize).lower()} but the checkpoint's feature extractor has do_normalize: "
            f"{str(bool(settings['do_normalize'])).lower()}; the model would see inputs unlike its pre-training. Remove data.normalize."
        )
    return settings


def probe_rates(job: JobSpec, split: Any) -> set[int]:
    """Sampling rates of the first :data:`PROBE_ROWS` clips of a split (headers only)."""
    from cluster.ingest.rows import open_dataset
    from engine.preprocessing.audio import audio_info

    column = job.data.audio_column
    values = open_dataset(split.files, split.format).head(PROBE_ROWS, columns=[column]).column(0).to_pylist()
    base_dir = os.path.dirname(split.files[0])
    rates = set()
    for row, value in enumerate(values, start=1):
        shown = value if isinstance(value, str) else (value or {}).get("path") if isinstance(value, dict) else "<bytes>"
        try:
            rate, frames = audio_info(value, base_dir)
        except Exception as exc:  # soundfile raises several types for missing or unreadable audio
            raise JobError(
                f"data.{split.name}: row {row}: could not read the audio '{shown}' in column '{column}' ({str(exc).splitlines()[0]}). "
                f"Relative paths are relative to the manifest's folder ({base_dir}); give readable wav/flac files or bytes."
            ) from None
        if frames == 0:
            raise JobError(f"data.{split.name}: row {row}: the audio '{shown}' in column '{column}' is empty (0 samples). Remove the row or give the clip.")
        rates.add(rate)
    return rates


def check_speech(job: JobSpec, splits: dict[str, Any]) -> None:
    """Feature options and every split's sampling rate against the checkpoint's (resample and log, or refuse)."""
    from engine.preprocessing.audio import SamplingRateError, check_rate

    settings = check_feature_options(job)
    get_task(job.model.task).check_settings(job)
    rate = int(settings.get("sampling_rate") or 16000)
    for split in splits.values():
        for found in sorted(probe_rates(job, split)):
            try:
                check_rate(found, rate, job.data.resample, where=f"data.{split.name}")
            except SamplingRateError as exc:
                raise JobError(str(exc)) from None


def prepare_speech_job(job: JobSpec, info: Any) -> JobSpec:
    """The job with its target tokenizer settled: a built CTC vocabulary when the checkpoint has none."""
    if getattr(job, "safeguards", None) is not None and job.safeguards.track_forgetting:
        log.info("safeguards.track_forgetting: retention sets are text; not measured for the speech task '%s'", job.model.task)
        job = job.model_copy(update={"safeguards": job.safeguards.model_copy(update={"track_forgetting": False})})
    model = job.model
    if model.tokenizer and os.path.isdir(os.path.expanduser(model.tokenizer)):
        return job.model_copy(update={"model": model.model_copy(update={"tokenizer": os.path.abspath(os.path.expanduser(model.tokenizer))})})

    def transcripts() -> list[str]:
        from cluster.ingest.rows import open_dataset

        split = info.splits["train"]
        return open_dataset(split.files, split.format).to_table(columns=[job.data.transcript_column]).column(0).to_pylist()

    return get_task(model.task).settle_target_tokenizer(job, transcripts, job.output_dir / "vocab")
