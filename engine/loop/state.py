"""The typed train state: where one worker's training stands, what a checkpoint saves and a resume restores.

On disk (see :mod:`engine.checkpoints.store`) it is two parts:

- shared by every rank, written by rank 0 as ``state.json["train"]``: :meth:`TrainState.shared`;
- this rank's own, in ``rank-<r>/position.json`` (:meth:`TrainState.rank_position`) and
  ``rank-<r>/rng.safetensors`` (the process RNGs and :attr:`TrainState.generators`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainState:
    """One worker's training state.

    Attributes:
        step: optimizer steps taken.
        epoch: passes over the training shard completed.
        batches_in_epoch: micro-batches of the current epoch already trained on (the position in the
            stream: the epoch's order is deterministic, so a resume skips exactly these).
        restarts: how many times this run was restarted (keeps checkpoint folder names unique).
        best: the best value of the job's evaluation metric so far (None before the first evaluation).
        evals_without_improvement: evaluations since ``best`` last improved (early stopping counts these).
        history: every evaluation's metrics, in order.
        worker_nodes: the Ray node id of every rank, in rank order.
        answers: the greedy answers recorded at each evaluation (generative tasks with samples).
        sample_ids: this rank's consumed sample ids, in order (with ``data.id_column``).
        generators: named torch generators whose states a checkpoint saves with the process RNGs.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    restarts: int = 0
    best: float | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)
    sample_ids: list[int] = field(default_factory=list)
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def shared(self) -> dict[str, Any]:
        """``state.json["train"]``: the part every rank agrees on (``answers`` only once there are some)."""
        out = {
            "step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "restarts": self.restarts,
            "best": self.best, "evals_without_improvement": self.evals_without_improvement, "history": self.history,
            "worker_nodes": self.worker_nodes,
        }
        if self.answers:
            out["answers"] = self.answers
        return out

    def rank_position(self, extras: dict[str, Any] | None = None) -> dict[str, Any]:
        """``rank-<r>/position.json`` (less the RNG states, which the checkpoint adds): the consumed sample
        ids, then any ``extras`` a hook records (e.g. a digest of the frozen weights)."""
        return {"sample_ids": self.sample_ids, **(extras or {})}

    def restore(self, shared: dict[str, Any], position: dict[str, Any], restarts: int) -> None:
        """Take the saved ``state.json["train"]`` and this rank's position; ``restarts`` is this attempt's index."""
        self.step, self.epoch, self.batches_in_epoch = shared["step"], shared["epoch"], shared["batches_in_epoch"]
        self.best, self.evals_without_improvement = shared["best"], shared["evals_without_improvement"]
        self.history = list(shared["history"])
        self.worker_nodes = list(shared.get("worker_nodes", []))
        self.answers = list(shared.get("answers", []))
        self.sample_ids = list(position.get("sample_ids", []))
        self.restarts = restarts

    def next_epoch(self) -> None:
        """The shard is exhausted: the next epoch starts at its first batch."""
        self.epoch, self.batches_in_epoch = self.epoch + 1, 0
