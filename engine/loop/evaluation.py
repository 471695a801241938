"""One evaluation pass of the loop: the forward of a micro-batch, and the validation metrics reduced
across workers."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from engine.backends import partitions_parameters
from engine.config.schema import JobSpec
from engine.evaluation.exported import in_lockstep, sum_across_workers
from engine.loop.batches import batch_rows
from engine.tasks import get_task


def loss_step(model: nn.Module, batch: dict[str, torch.Tensor], amp_dtype: torch.dtype | None, device: torch.device) -> Any:
    """Forward one micro-batch (under autocast when mixed precision is on) and return the model outputs."""
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with ctx:
        return model(**batch)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Any, job: JobSpec, num_labels: int | None, device: torch.device, amp_dtype: torch.dtype | None,
) -> dict[str, float]:
    """One pass over this worker's validation rows (every row is on exactly one worker, see
    ``cluster.ingest.datasets.EveryRowDataConfig``); metrics reduced across workers, ``rows`` counted over all of them."""
    model.eval()
    # DDP: the module itself. DDP's forward broadcasts buffers (the first after a training step), a collective
    # that a worker with fewer or no validation rows would never join: the others would wait forever.
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    task = get_task(job.model.task)
    metrics = task.build_metrics(job, num_labels, device, net, amp_dtype)
    lockstep = partitions_parameters(job)  # ZeRO-3: every forward gathers parameters, so all workers run as many
    uncounted = task.build_metrics(job, num_labels, device, net, amp_dtype) if lockstep else None
    rows = 0
    for batch, counted in in_lockstep(list(batches), device) if lockstep else ((b, True) for b in batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        (metrics if counted else uncounted).update(loss_step(net, batch, amp_dtype, device), batch)
        rows += batch_rows(batch) if counted else 0
    model.train()
    return {**metrics.compute(), "rows": sum_across_workers(rows, device)}
