"""Distributed backends: what the training loop talks to instead of a raw model and optimizer.

A backend wraps the prepared model (torch DDP, or a DeepSpeed ZeRO engine), owns the optimizer built from
the job's LR-ratio parameter groups and the LR schedule, and hides gradient accumulation, clipping and
mixed precision behind two calls: :meth:`Backend.forward_backward` per micro-batch and
:meth:`Backend.step` (True when an optimizer step ran). Model code never knows which backend runs it.
Only ``engine/backends/deepspeed.py`` imports ``deepspeed``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from engine.config.schema import JobSpec


class Backend(Protocol):
    """The interface ``engine.loop`` uses; see :mod:`engine.backends.ddp` and :mod:`engine.backends.deepspeed`."""

    module: nn.Module
    """The unwrapped model (PEFT or transformers); its parameter names are the checkpoint's names."""

    def train(self, mode: bool = True) -> None:
        """Switch dropout etc. on (training) or off (evaluation)."""

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Model outputs for one batch (no backward), under the job's precision."""

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Forward and backward one micro-batch, accumulating gradients; returns the model outputs."""

    def step(self) -> bool:
        """Clip, step the optimizer and the LR schedule at an accumulation boundary; True when it stepped."""

    def group_lrs(self) -> dict[str, float]:
        """The learning rate the optimizer applies now, by parameter-group name."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 trainable weights by name, on CPU (a collective: every rank calls it; ZeRO-3 gathers)."""

    def save(self, folder: Path, rank: int) -> None:
        """Write this rank's optimizer / schedule / engine state into ``folder`` (a collective)."""

    def load(self, folder: Path) -> None:
        """Restore weights, optimizer and schedule from a complete checkpoint folder (a collective)."""

    def rewrap(self) -> None:
        """Re-wrap the model after its trainable set changed (gradual unfreezing)."""

    def gathered(self) -> AbstractContextManager[None]:
        """Context in which every parameter of ``module`` is whole on every rank (ZeRO-3 gathers; a collective)."""


def partitions_parameters(job: JobSpec) -> bool:
    """Whether the backend shards the parameters themselves (DeepSpeed ZeRO-3): model rewrites that read
    frozen weights directly (``perf``'s fused LoRA / FP8 frozen linears) must then stay off."""
    if job.backend.name != "deepspeed":
        return False
    from engine.backends.ds_config import zero_stage

    return zero_stage(job.backend) == 3


def build_backend(
    job: JobSpec,
    model: nn.Module,
    groups: list[dict[str, Any]],
    total_steps: int,
    warmup_steps: int,
    device: torch.device,
    world_size: int,
) -> Backend:
    """The job's ``backend.name`` around ``model``, with an optimizer over ``groups`` and the job's schedule."""
    if job.backend.name == "deepspeed":
        from engine.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(job, model, groups, total_steps, warmup_steps, device, world_size)
    from engine.backends.ddp import DDPBackend

    return DDPBackend(job, model, groups, total_steps, warmup_steps, device, world_size)
