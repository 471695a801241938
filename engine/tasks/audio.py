"""The audio modality's share of the task protocol: clips featurised by the checkpoint's own feature extractor.

:func:`featurize_rows` is what Ray Data maps (module-level, so it pickles); decoding, resampling and
featurising are ``engine.preprocessing.speech``'s. Speech-recognition tasks (:class:`AsrTask`) add a target
tokenizer, transcripts as labels, and WER/CER on decoded text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from engine.tasks.base import Task

if TYPE_CHECKING:
    from engine.config.schema import JobSpec


def featurize_rows(batch: dict[str, np.ndarray], model_name: str, revision: str | None, tokenizer_name: str | None,
                   language: str | None, asr_task: str, **kwargs: Any) -> dict[str, np.ndarray]:
    """:func:`engine.preprocessing.speech.featurize_batch` with the named checkpoint's feature extractor (and target tokenizer)."""
    from engine.models.speech import load_feature_extractor, load_target_tokenizer
    from engine.preprocessing.speech import featurize_batch

    tokenizer = load_target_tokenizer(tokenizer_name, revision, language, asr_task) if tokenizer_name else None
    return featurize_batch(batch, feature_extractor=load_feature_extractor(model_name, revision), tokenizer=tokenizer, **kwargs)


class AudioTask(Task):
    """A task on audio clips (``data.audio_column``: paths relative to the manifest, or audio bytes)."""

    modality = "audio"
    has_classes: ClassVar[bool] = False
    """Declarative, for this share's column and preprocessing choices: the targets are class names (``data.label_column``)."""
    transcribes: ClassVar[bool] = False
    """Declarative, for this share's preprocessing and metrics: the targets are transcripts (WER, CER)."""

    def forgetting_measure(self, job: JobSpec) -> str | None:
        """None: retention sets are text."""
        return None

    def required_columns(self, job: JobSpec) -> list[str]:
        """``audio_column`` and the target: ``label_column`` (classes) or ``transcript_column``."""
        return ["audio_column", "label_column" if self.has_classes else "transcript_column"]

    def decoder_start_token_id(self, source: str, job: JobSpec) -> int | None:
        """The decoder's start token that transcripts are prefixed with (None: no decoder)."""
        return None

    def batch_preprocessor(self, job: JobSpec, labels: list[str] | None, *, source: str | None = None, keep_ids: bool = False,
                           base_dir: str | None = None) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """Decode, resample and featurise with the checkpoint's feature extractor; only model inputs remain.

        ``source``: where the feature extractor and target tokenizer are (default: the job's checkpoint;
        ``shoulders eval`` passes the exported model folder).
        """
        model_name = source or job.model.name
        return functools.partial(
            featurize_rows,
            model_name=model_name,
            revision=job.model.revision,
            tokenizer_name=(source or job.model.tokenizer or job.model.name) if self.transcribes else None,
            language=job.model.language,
            asr_task=job.model.asr_task,
            audio_column=job.data.audio_column,
            max_seconds=job.data.max_audio_seconds,
            allow_resample=job.data.resample,
            base_dir=base_dir,
            label_column=job.data.label_column if self.has_classes else None,
            labels=labels,
            transcript_column=job.data.transcript_column if self.transcribes else None,
            max_label_length=job.data.max_length,
            decoder_start_token_id=self.decoder_start_token_id(model_name, job),
        )

    def target_tokenizer(self, job: JobSpec) -> Any:
        """The tokenizer of the targets (None: class targets)."""
        return None

    def preprocessors(self, job: JobSpec) -> tuple[list[Any], int | None]:
        """The checkpoint's feature extractor (plus the target tokenizer for ASR); the model's pad id."""
        from engine.models.speech import load_feature_extractor

        tokenizer = self.target_tokenizer(job)
        preprocessors = [load_feature_extractor(job.model.name, job.model.revision)] + ([tokenizer] if tokenizer is not None else [])
        return preprocessors, self.pad_token_id(tokenizer)

    def pad_token_id(self, tokenizer: Any) -> int | None:
        """The pad id the model's config gets from the target tokenizer (None: the checkpoint's own)."""
        return None


class AsrTask(AudioTask):
    """Speech recognition: transcripts as targets (``data.transcript_column``), WER and CER on decoded text."""

    metrics = ("loss", "wer", "cer")
    default_metric = "wer"
    transcribes = True

    def check_job(self, job: JobSpec) -> None:
        """Transcripts, not classes: ``model.labels`` must be empty."""
        super().check_job(job)
        if job.model.labels:
            raise ValueError(f"model.labels is set but model.task is '{self.name}', whose targets are transcripts: remove model.labels")

    def target_tokenizer(self, job: JobSpec) -> Any:
        """The job's target tokenizer (``model.tokenizer`` or the checkpoint's), with its language and task tokens."""
        from engine.models.speech import load_target_tokenizer, tokenizer_name

        return load_target_tokenizer(tokenizer_name(job), job.model.revision, job.model.language, job.model.asr_task)

    def predictions(self, model: Any, tokenizer: Any, job: JobSpec, amp_dtype: Any) -> Callable[[Any, dict[str, Any]], list[str]]:
        """``(outputs, batch) -> transcripts`` of one evaluation batch."""
        raise NotImplementedError

    def build_metrics(self, job: JobSpec, num_labels: int | None, device: Any, model: Any = None, amp_dtype: Any = None,
                      tokenizer: Any = None) -> Any:
        """Loss, WER and CER on decoded text (``engine.evaluation.metrics.AsrMetrics``); ``tokenizer`` left empty: the job's."""
        from engine.evaluation.metrics import AsrMetrics

        tokenizer = tokenizer if tokenizer is not None else self.target_tokenizer(job)

        def references(labels: Any) -> list[str]:
            return self.decode_references(labels, tokenizer)

        return AsrMetrics(self.predictions(model, tokenizer, job, amp_dtype), references, device)

    def decode_references(self, labels: Any, tokenizer: Any) -> list[str]:
        """Reference transcripts from label ids (ignored positions dropped)."""
        from engine.evaluation.asr import decode_references

        return decode_references(labels, tokenizer, False)

    def export_metrics(self, job: JobSpec, model: Any, export_dir: Any, device: str) -> Any:
        """ASR metrics of an exported folder, decoding with the tokenizer saved in it."""
        import torch

        from engine.models.speech import load_target_tokenizer

        tokenizer = load_target_tokenizer(str(export_dir), None, job.model.language, job.model.asr_task)
        return self.build_metrics(job, None, torch.device(device), model, None, tokenizer)
