"""Evaluating an exported model folder (merged model or PEFT adapter) on tokenized batches, and the
helpers that let the workers' validation pass count every row exactly once."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from engine.tasks import get_task


def load_exported(model_dir: str | Path, task: str, labels: list[str] | None) -> Any:
    """Load an export with plain ``transformers`` (merged) or ``peft`` (adapter folder)."""
    import transformers

    model_dir = Path(model_dir)
    auto_class = getattr(transformers, get_task(task).auto_class)
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
    (ASR tasks' ``export_metrics`` decode text with the export's tokenizer)."""
    model.to(device).eval()
    if metrics is None:
        metrics = get_task(task).build_metrics(None, num_labels, torch.device(device))
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        metrics.update(model(**batch), batch)
    return metrics.compute()


def sum_across_workers(value: int, device: torch.device) -> int:
    """``value`` summed over every worker of the process group (itself when not distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def in_lockstep(batches: list[dict[str, torch.Tensor]], device: torch.device) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """This worker's validation batches as ``(batch, counted)``, then uncounted repeats until it runs as many
    forwards as the busiest worker.

    Validation rows are split unevenly (every row on exactly one worker), so workers may hold different
    numbers of batches. Where every forward is collective (DeepSpeed ZeRO-3 gathers the parameters in each),
    all workers must run the same number of forwards, so the counts are exchanged before the first one
    (which is why the batches come as a list). A short worker repeats its first batch, or one borrowed from
    the first worker that has any.
    """
    import torch.distributed as dist

    own = [(batch, True) for batch in batches]
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return own
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(batches)], dtype=torch.int64, device=device))
    counts = [int(c.item()) for c in counts]
    template = batches[0] if batches else None
    if min(counts) == 0 and max(counts) > 0:  # a worker without any batch borrows the first one's
        src = next(rank for rank, c in enumerate(counts) if c > 0)
        holder = [{k: v.cpu() for k, v in template.items()} if dist.get_rank() == src else None]
        dist.broadcast_object_list(holder, src=src)
        template = template if template is not None else holder[0]
    return own + [(template, False)] * (max(counts) - len(batches))
