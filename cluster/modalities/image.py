"""Images on the driver: the checkpoint's image processor, the image-folder layout, images opened in the row
rules (sampled before the run, every row while streaming), processed Ray Data datasets."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cluster.ingest.rows import RowRules
from cluster.ingest.splits import DataInfo, SplitInfo
from cluster.modalities.base import Modality, count

if TYPE_CHECKING:
    import ray.data

    from cluster.preflight.model_files import ModelFiles
    from engine.config.schema import JobSpec


class ImageModality(Modality):
    """Inputs an image processor reads."""

    name = "image"

    def resolve_split(self, job: JobSpec, key: str, path: str) -> tuple[list[str], str] | None:
        """An image folder (``<split>/<label>/*.png|jpg``) is read through a manifest of its images and labels."""
        from cluster.ingest.image import folder_manifest

        manifest = folder_manifest(path, key, job.data.image_column, job.data.label_column)
        return ([manifest], "parquet") if manifest else None

    def row_rules(self, job: JobSpec, split: SplitInfo, labels: list[str] | None) -> RowRules:
        from cluster.ingest.image import data_dir

        return replace(super().row_rules(job, split, labels), image_columns=(job.data.image_column,), base_dir=data_dir(split))

    def check_model_files(self, files: ModelFiles, job: JobSpec) -> None:
        from engine.models.vision import PREPROCESSOR_FILE, image_processor_settings

        if files.find(PREPROCESSOR_FILE) or not files.hub:
            image_processor_settings(job.model.name, job.model.revision)  # present and readable, or refused naming the fix

    def block_count(self, config: dict[str, Any]) -> int | None:
        """ViT-style encoders count layers; CNNs and hierarchical transformers their stages (ResNet, ConvNeXt, Swin:
        ``depths``); EfficientNet its MBConv blocks."""
        if "num_block_repeats" in config:  # EfficientNet: the blocks after depth scaling
            import math

            scale = config.get("depth_coefficient", 1.0)
            return count(sum(int(math.ceil(scale * r)) for r in config["num_block_repeats"]))
        if isinstance(config.get("depths"), list):
            return count(len(config["depths"]))
        return super().block_count(config)

    def check_data(self, job: JobSpec, splits: dict[str, SplitInfo]) -> None:
        from cluster.ingest.image import data_dir
        from cluster.preflight.image import check_images

        check_images(job, splits, data_dir)

    def build_datasets(self, job: JobSpec, info: DataInfo) -> tuple[dict[str, ray.data.Dataset], int]:
        from cluster.ingest.image import build_image_datasets

        return build_image_datasets(job, info, self.rules_by_split(job, info))

    def build_eval_dataset(self, job: JobSpec, split: SplitInfo, labels: list[str] | None, source: str) -> ray.data.Dataset:
        from cluster.ingest.image import build_image_eval_dataset

        return build_image_eval_dataset(job, split, labels, source, self.row_rules(job, split, labels))


MODALITY = ImageModality()
