"""Evaluation metrics per task, built on torchmetrics (synchronised across workers when distributed)."""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


class TaskMetrics:
    """Accumulates one evaluation pass: loss for every task, accuracy and macro-F1 for classification
    (``num_labels``), the loss per target token and perplexity for next-token prediction (``next_token_loss``).

    ``compute()`` returns plain floats; under torch.distributed the states are reduced across workers.
    """

    def __init__(self, num_labels: int | None, device: torch.device, next_token_loss: bool = False):
        self.next_token_loss = next_token_loss
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
        if self.next_token_loss:
            tokens = (labels[:, 1:] != -100).sum()
            self.loss.update(outputs.loss.detach().float(), weight=tokens)
            return
        self.loss.update(outputs.loss.detach().float(), weight=labels.numel())
        if self.classification is not None:
            self.classification.update(outputs.logits.argmax(dim=-1), labels)

    def compute(self) -> dict[str, float]:
        """The metrics of the pass (reduced across workers)."""
        result = {"loss": float(self.loss.compute())}
        if self.next_token_loss:
            result["perplexity"] = math.exp(min(result["loss"], 50.0))
        if self.classification is not None:
            result.update({k: float(v) for k, v in self.classification.compute().items()})
        return result


def normalize_text(text: str) -> str:
    """Lower case and single spaces, so WER/CER count words, not casing or spacing."""
    return " ".join(str(text).lower().split())


class AsrMetrics:
    """Loss, word and character error rate of an ASR pass, on decoded text (torchmetrics, reduced across workers).

    Args:
        decode_predictions: ``(outputs, batch) -> list[str]``: CTC greedy decoding of the logits, or
            generation for sequence-to-sequence models (see ``engine.evaluation.asr``).
        decode_references: ``labels -> list[str]``: the transcripts back from their label ids.
    """

    def __init__(self, decode_predictions, decode_references, device: torch.device):
        from torchmetrics.text import CharErrorRate, WordErrorRate

        self.decode_predictions, self.decode_references = decode_predictions, decode_references
        self.loss = MeanMetric().to(device)
        self.wer = WordErrorRate().to(device)
        self.cer = CharErrorRate().to(device)
        self.examples: list[tuple[str, str]] = []

    @torch.no_grad()
    def update(self, outputs, batch: dict[str, torch.Tensor]) -> None:
        """Add one batch: its loss, and the error rates of its decoded predictions against the references."""
        labels = batch["labels"]
        self.loss.update(outputs.loss.detach().float(), weight=labels.shape[0])
        predictions = [normalize_text(t) for t in self.decode_predictions(outputs, batch)]
        references = [normalize_text(t) for t in self.decode_references(labels)]
        self.wer.update(predictions, references)
        self.cer.update(predictions, references)
        if len(self.examples) < 3:
            self.examples.extend(list(zip(predictions, references))[: 3 - len(self.examples)])

    def compute(self) -> dict[str, float]:
        """Loss, WER and CER of the pass (reduced across workers)."""
        return {"loss": float(self.loss.compute()), "wer": float(self.wer.compute()), "cer": float(self.cer.compute())}
