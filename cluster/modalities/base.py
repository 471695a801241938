"""The protocol every modality object implements, with the defaults most modalities share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from cluster.ingest.rows import RowRules
from engine.tasks import get_task

if TYPE_CHECKING:
    import ray.data

    from cluster.ingest.splits import DataInfo, SplitInfo
    from cluster.preflight.model_files import ModelFiles
    from engine.config.schema import JobSpec

BLOCK_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""Config keys that hold the number of transformer blocks."""
TEXT_COLUMN_KEYS = ("text_column", "text_pair_column", "transcript_column", "prompt_column", "completion_column")
"""``data.*`` column keys whose values must be text."""


def count(value: Any) -> int | None:
    """A positive block count, or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class Modality:
    """What differs between kinds of input on the driver. Torch-free: Ray Data is imported only by the methods
    that build datasets (the ``validate`` and ``submit`` paths never call them)."""

    name: ClassVar[str]

    # ------------------------------------------------------------------ preflight (torch-free, no Ray)

    def required_columns(self, job: JobSpec) -> list[str]:
        """The ``data.*_column`` keys every split must have."""
        return get_task(job.model.task).required_columns(job)

    def row_rules(self, job: JobSpec, split: SplitInfo, labels: list[str] | None) -> RowRules:
        """What each row of ``split`` must hold (the same rules on the preflight's sample and on every streamed row)."""
        keys = self.required_columns(job)
        return RowRules(
            split=split.name,
            text_columns=tuple(getattr(job.data, k) for k in keys if k in TEXT_COLUMN_KEYS),
            label_column=job.data.label_column if "label_column" in keys else None,
            labels=tuple(labels) if labels and "label_column" in keys else None,
            other_columns=tuple(getattr(job.data, k) for k in keys if k not in TEXT_COLUMN_KEYS and k != "label_column"),
            skip=job.data.bad_rows == "skip",
            fmt=split.format,
            files=tuple(split.files),
        )

    def resolve_split(self, job: JobSpec, key: str, path: str) -> tuple[list[str], str] | None:
        """The files and format of a split given as a path, where the modality reads a layout of its own
        (an image folder); None: the path's data files (parquet, jsonl, csv)."""
        return None

    def check_model_files(self, files: ModelFiles, job: JobSpec) -> None:
        """Checks of the checkpoint's preprocessing files (tokenizer, feature extractor, image processor)."""

    def block_count(self, config: dict[str, Any]) -> int | None:
        """The blocks ``finetune.freeze_depth`` counts, from the checkpoint's config; None when only loading tells."""
        return next((count(config[key]) for key in BLOCK_COUNT_KEYS if key in config), None)

    def check_data(self, job: JobSpec, splits: dict[str, SplitInfo]) -> None:
        """The modality's own checks of the splits' sampled rows and of its settings (after the columns are known)."""

    def check_retention(self, job: JobSpec) -> None:
        """``safeguards.retention_data`` where the modality can measure forgetting on it."""

    def prepare_job(self, job: JobSpec, info: DataInfo) -> JobSpec:
        """The job as the workers get it, once the data is known (e.g. a vocabulary built from transcripts)."""
        return job

    # ------------------------------------------------------------------ ingest (Ray Data, on the data CPUs)

    def build_datasets(self, job: JobSpec, info: DataInfo) -> tuple[dict[str, ray.data.Dataset], int]:
        """The preprocessed ``train`` and ``validation`` datasets, and the number of training rows."""
        raise NotImplementedError

    def build_eval_dataset(self, job: JobSpec, split: SplitInfo, labels: list[str] | None, source: str) -> ray.data.Dataset:
        """A preprocessed dataset of ``split`` for evaluating a finished model whose preprocessing files are in ``source``."""
        raise NotImplementedError

    def rules_by_split(self, job: JobSpec, info: DataInfo) -> dict[str, RowRules]:
        """:meth:`row_rules` of every split of ``info``."""
        return {name: self.row_rules(job, split, info.labels) for name, split in info.splits.items()}
