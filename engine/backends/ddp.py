"""Plain data parallelism: torch ``DistributedDataParallel`` (or the bare model on one worker)."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine.backends.master import MasterWeights, cast_batch, upcast_logits
from engine.checkpoints.store import WEIGHTS, load_trainable_state, trained_buffers
from engine.config.schema import JobSpec
from engine.loop.optim import build_optimizer, build_scheduler
from engine.perf.fastlinear import fast_frozen_buffer_names
from engine.tasks import get_task

log = logging.getLogger(__name__)

OPTIMIZER = "optimizer.pt"
SCHEDULE = "schedule.json"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the job's ``optim.precision`` on ``device`` (None: full fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def uses_master_weights(job: JobSpec, device: torch.device) -> bool:
    """Whether the job trains bf16 weights with fp32 masters (``perf.trainable_weights_in_compute_dtype``
    with bf16 compute) instead of fp32 weights under autocast."""
    if not job.perf.trainable_weights_in_compute_dtype:
        return False
    if autocast_dtype(job.optim.precision, device) != torch.bfloat16:
        log.info("perf.trainable_weights_in_compute_dtype skipped: it needs bf16 compute (optim.precision %s on %s)",
                 job.optim.precision, device.type)
        return False
    return True


def ignore_fast_frozen_buffers(module: nn.Module) -> None:
    """Keep DDP away from the fast frozen copies (:func:`engine.perf.fastlinear.fast_frozen_buffer_names`):
    left in, DDP would broadcast every frozen weight at the start of each forward."""
    names = fast_frozen_buffer_names(module)
    if names:
        known = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted({*known, *names}))


class DDPBackend:
    """Torch AdamW over the LR-ratio groups, autocast mixed precision (or bf16 weights with fp32 masters,
    :mod:`engine.backends.master`), gradient accumulation with ``no_sync``, global-norm clipping. Rank 0
    saves the (replicated) optimizer state."""

    def __init__(
        self, job: JobSpec, model: nn.Module, groups: list[dict[str, Any]], total_steps: int, warmup_steps: int,
        device: torch.device, world_size: int,
    ) -> None:
        self.module, self.device, self.world_size = model, device, world_size
        self.accum, self.max_grad_norm = job.optim.grad_accum, job.optim.max_grad_norm
        self.amp_dtype = autocast_dtype(job.optim.precision, device)
        self.master = MasterWeights(model, groups, self.amp_dtype) if uses_master_weights(job, device) else None
        if self.master is not None and not get_task(job.model.task).next_token_loss:  # transformers' causal-LM loss upcasts itself
            upcast_logits(model)
        self.optimizer = build_optimizer(self.master.groups if self.master else groups, job.optim.betas, device)
        self.scheduler = build_scheduler(self.optimizer, total_steps, warmup_steps, job.optim.schedule)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.micro = 0
        self.rewrap()

    def rewrap(self) -> None:
        """Wrap ``module`` in DDP (again, after its trainable set changed); a bare module on one worker."""
        if self.world_size == 1:
            self.model = self.module
        else:
            ids = [self.device.index] if self.device.type == "cuda" else None
            ignore_fast_frozen_buffers(self.module)
            self.model = DistributedDataParallel(self.module, device_ids=ids)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def gathered(self) -> nullcontext:
        return nullcontext()

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        if self.master is not None:  # the weights are bf16 already: no autocast, bf16 inputs
            return self.model(**cast_batch(batch, self.amp_dtype))
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with ctx:
            return self.model(**batch)

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> Any:
        self.micro += 1
        boundary = self.micro % self.accum == 0
        sync = nullcontext() if boundary or self.model is self.module else self.model.no_sync()
        with sync:
            outputs = self.forward(batch)
            self.scaler.scale(outputs.loss / self.accum).backward()
        if self.master is not None:
            # Every micro-batch's bf16 gradients go into the fp32 sums at once. With DDP, the window's earlier
            # micro-batches (under no_sync) are local sums: averaged over the workers in one fp32 all-reduce
            # at the boundary, before the boundary micro-batch's gradients (which DDP averaged) are added.
            if boundary and self.model is not self.module and self.accum > 1:
                self.master.all_reduce_grads(self.world_size)
            self.master.accumulate_grads()
        return outputs

    def step(self) -> bool:
        if self.micro % self.accum:
            return False
        params = self.master.masters if self.master is not None else self.module.parameters()
        if self.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            self.master.publish()
        return True

    def group_lrs(self) -> dict[str, float]:
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        buffers = trained_buffers(self.module)  # batch-norm running statistics: rank 0's are saved
        if self.master is not None:
            return {**self.master.state(), **buffers}
        return {**{n: p.detach().to("cpu").contiguous() for n, p in self.module.named_parameters() if p.requires_grad}, **buffers}

    def save(self, folder: Path, rank: int) -> None:
        if rank != 0:
            return
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER)
        schedule = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "micro": self.micro}
        (folder / SCHEDULE).write_text(json.dumps(schedule))

    def load(self, folder: Path) -> None:
        weights = load_file(folder / WEIGHTS, device=str(self.device))
        load_trainable_state(self.module, weights)
        if self.master is not None:
            self.master.load(weights)
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER, map_location=self.device, weights_only=True))
        schedule = json.loads((folder / SCHEDULE).read_text())
        self.scheduler.load_state_dict(schedule["scheduler"])
        if schedule["scaler"]:
            self.scaler.load_state_dict(schedule["scaler"])
        self.micro = schedule["micro"]
