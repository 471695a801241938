"""Evaluation metrics per task, built on torchmetrics (synchronised across workers when distributed)."""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


class TaskMetrics:
    """Accumulates one evaluation pass: loss for every task, accuracy and macro-F1 for classification.

    ``compute()`` returns plain floats; under torch.distributed the states are reduced across workers.
    """

    def __init__(self, task: str, num_labels: int | None, device: torch.device):
        self.task = task
        self.loss = MeanMetric().to(device)
        self.classification = None
        if num_labels:
            self.classification = MetricCollection(
                {
                    "accuracy": MulticlassAccuracy(num_classes=num_labels, average="micro"),
                    "macro_f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
                }
            ).to(device)

    @torch.no_grad()
    def update(self, outputs, batch: dict[str, torch.Tensor]) -> None:
        """Add one batch's model outputs."""
        labels = batch["labels"]
        if self.task == "causal_lm":
            tokens = (labels[:, 1:] != -100).sum()
            self.loss.update(outputs.loss.detach().float(), weight=tokens)
            return
        self.loss.update(outputs.loss.detach().float(), weight=labels.numel())
        if self.classification is not None:
            self.classification.update(outputs.logits.argmax(dim=-1), labels)

    def compute(self) -> dict[str, float]:
        """The metrics of the pass (reduced across workers)."""
        result = {"loss": float(self.loss.compute())}
        if self.task == "causal_lm":
            result["perplexity"] = math.exp(min(result["loss"], 50.0))
        if self.classification is not None:
            result.update({k: float(v) for k, v in self.classification.compute().items()})
        return result
