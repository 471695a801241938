"""Ray Data ingest on the driver, for every modality: the datasets a job trains and evaluates on, and how Ray
Train splits them between the workers.

Datasets stay lazy and stream into the workers (``ray.train.get_dataset_shard``); nothing is materialised on the
driver. How a split is read, decoded and preprocessed is the modality's (``cluster.modalities``).
"""

from __future__ import annotations

from typing import Any

import ray.data
import ray.train

from cluster.ingest.read import limit_block_size
from cluster.ingest.splits import DataInfo, SplitInfo
from cluster.modalities import modality_of
from engine.config.schema import JobSpec


def build_datasets(job: JobSpec, info: DataInfo) -> tuple[dict[str, ray.data.Dataset], int]:
    """The preprocessed ``train`` and ``validation`` datasets of a job, and the number of training rows."""
    limit_block_size()
    return modality_of(job).build_datasets(job, info)


def build_eval_dataset(job: JobSpec, split: SplitInfo, labels: list[str] | None, source: str) -> ray.data.Dataset:
    """A preprocessed dataset for evaluating a finished model (its preprocessing files in ``source``) on ``split``."""
    return modality_of(job).build_eval_dataset(job, split, labels, source)


class EveryRowDataConfig(ray.train.DataConfig):
    """Ray Train's ingest, except that evaluation datasets reach every row exactly once, on any number of
    workers.

    Ray Train splits every dataset with ``streaming_split(equal=True)``, which drops rows so each worker
    gets as many: 75 validation rows on two workers scored 74. The datasets named in ``uneven`` (the
    validation split) are split with ``equal=False`` instead: no row dropped or repeated, the workers' shares
    may differ, and the metrics are reduced as sums over workers (``engine.loop.evaluation.evaluate``).
    """

    def __init__(self, uneven: tuple[str, ...] = ("validation",), **kwargs: Any):
        super().__init__(**kwargs)
        self.uneven = set(uneven)

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
        even = {name: ds for name, ds in datasets.items() if name not in self.uneven}
        output = super().configure(even, world_size, worker_handles, worker_node_ids, **kwargs)
        for name in sorted(self.uneven & datasets.keys()):
            ds = datasets[name]
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)  # as Ray Train does for the others
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[rank][name] = split
        return output
