"""Text on the driver: tokenizer files, the ``data.layout`` columns (text, prompt/completion, chat), the chat
template and layout rows, a retention set of source-like text, tokenized Ray Data datasets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cluster.ingest.splits import DataInfo, SplitInfo
from cluster.modalities.base import Modality
from cluster.preflight.model_files import check_tokenizer
from cluster.preflight.text import (
    check_retention_text,
    check_text,
    text_required_columns,
)

if TYPE_CHECKING:
    import ray.data

    from cluster.preflight.model_files import ModelFiles
    from engine.config.schema import JobSpec


class TextModality(Modality):
    """Inputs a tokenizer reads."""

    name = "text"

    def required_columns(self, job: JobSpec) -> list[str]:
        if job.data.layout != "text":
            return text_required_columns(job)
        return super().required_columns(job)

    def check_model_files(self, files: ModelFiles, job: JobSpec) -> None:
        check_tokenizer(files, job)

    def block_count(self, config: dict[str, Any]) -> int | None:
        if "encoder_layers" in config and "decoder_layers" in config:
            return None  # an encoder-decoder text model: the stack freeze_depth counts is found at load time
        return super().block_count(config)

    def check_data(self, job: JobSpec, splits: dict[str, SplitInfo]) -> None:
        check_text(job, splits)

    def check_retention(self, job: JobSpec) -> None:
        check_retention_text(job)

    def build_datasets(self, job: JobSpec, info: DataInfo) -> tuple[dict[str, ray.data.Dataset], int]:
        from cluster.ingest.text import build_text_datasets

        return build_text_datasets(job, info, self.rules_by_split(job, info))

    def build_eval_dataset(self, job: JobSpec, split: SplitInfo, labels: list[str] | None, source: str) -> ray.data.Dataset:
        from cluster.ingest.text import build_text_eval_dataset

        return build_text_eval_dataset(job, split, labels, source, self.row_rules(job, split, labels))


MODALITY = TextModality()
