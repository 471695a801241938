"""Audio on the driver: the checkpoint's feature extractor and sampling rate against the clips' (probed in the
preflight), a vocabulary built from transcripts when a CTC checkpoint has none, featurised Ray Data datasets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cluster.ingest.splits import DataInfo, SplitInfo
from cluster.modalities.base import Modality, count
from cluster.preflight.speech import check_speech, prepare_speech_job

if TYPE_CHECKING:
    import ray.data

    from engine.config.schema import JobSpec


class AudioModality(Modality):
    """Inputs a feature extractor reads from waveforms."""

    name = "audio"

    def block_count(self, config: dict[str, Any]) -> int | None:
        if "encoder_layers" in config:  # Whisper: freeze_depth counts the audio encoder's blocks
            return count(config["encoder_layers"])
        return super().block_count(config)

    def check_data(self, job: JobSpec, splits: dict[str, SplitInfo]) -> None:
        check_speech(job, splits)

    def prepare_job(self, job: JobSpec, info: DataInfo) -> JobSpec:
        return prepare_speech_job(job, info)

    def build_datasets(self, job: JobSpec, info: DataInfo) -> tuple[dict[str, ray.data.Dataset], int]:
        from cluster.ingest.speech import build_speech_datasets

        return build_speech_datasets(job, info, self.rules_by_split(job, info))

    def build_eval_dataset(self, job: JobSpec, split: SplitInfo, labels: list[str] | None, source: str) -> ray.data.Dataset:
        from cluster.ingest.speech import build_speech_eval_dataset

        return build_speech_eval_dataset(job, split, labels, source, self.row_rules(job, split, labels))


MODALITY = AudioModality()
