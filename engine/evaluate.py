"""Evaluating an exported model folder (merged model or PEFT adapter) on tokenized batches."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from engine.metrics import TaskMetrics
from engine.models.loading import AUTO_CLASSES


def load_exported(model_dir: str | Path, task: str, labels: list[str] | None) -> Any:
    """Load an export with plain ``transformers`` (merged) or ``peft`` (adapter folder)."""
    import transformers

    model_dir = Path(model_dir)
    auto_class = getattr(transformers, AUTO_CLASSES[task])
    adapter_config = model_dir / "adapter_config.json"
    if not adapter_config.exists():
        return auto_class.from_pretrained(model_dir)
    from engine.adapters import load_adapter_model

    base_name = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    if (model_dir / "config.json").exists():  # the base config with the label names, saved beside the adapter
        kwargs: dict[str, Any] = {"config": transformers.AutoConfig.from_pretrained(model_dir)}
    else:
        kwargs = {"num_labels": len(labels)} if labels else {}
    return load_adapter_model(auto_class.from_pretrained(base_name, **kwargs), str(model_dir))


@torch.no_grad()
def evaluate_model(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], task: str, num_labels: int | None, device: str = "cpu", metrics: Any = None,
) -> dict[str, float]:
    """Task metrics of ``model`` over ``batches`` (single process); ``metrics`` replaces the task's default
    (ASR passes ``engine.asr.build_metrics``, which decodes text)."""
    model.to(device).eval()
    if metrics is None:
        metrics = TaskMetrics(task, num_labels, torch.device(device))
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        metrics.update(model(**batch), batch)
    return metrics.compute()
