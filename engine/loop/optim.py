"""Parameter groups and learning-rate ratios: the only place LR ratios take effect."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from engine.adapters import is_adapter_parameter

log = logging.getLogger(__name__)

GROUP_NAMES = ("head", "adapter", "backbone")


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Decay matrices only: never biases, norm weights or other 1-D tensors (nanoGPT's rule)."""
    return param.ndim >= 2 and "norm" not in name.lower()


def parameter_role(name: str, head_names: list[str]) -> str:
    """``head`` (new task head), ``adapter`` (new PEFT weights) or ``backbone`` (pre-trained weights)."""
    if is_adapter_parameter(name):
        return "adapter"
    # PEFT renames the head to base_model.model.<head>.modules_to_save.default.*
    parts = name.split(".")
    if any(h in parts for h in head_names):
        return "head"
    return "backbone"


def build_param_groups(
    model: nn.Module,
    head_names: list[str],
    head_lr: float,
    backbone_lr_ratio: float,
    adapter_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer groups for the trainable parameters of ``model``.

    The head learns at ``head_lr``, adapters at ``head_lr * adapter_lr_ratio`` and pre-trained backbone
    weights at ``head_lr * backbone_lr_ratio``; each is split into a decayed and a non-decayed group.
    Frozen parameters are left out. Each group carries ``name`` and ``initial_lr`` (the LR schedule scales
    from it).
    """
    lrs = {"head": head_lr, "adapter": head_lr * adapter_lr_ratio, "backbone": head_lr * backbone_lr_ratio}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (parameter_role(name, head_names), uses_weight_decay(name, param))
        buckets.setdefault(key, []).append(param)
    groups = []
    for role in GROUP_NAMES:
        for decay in (True, False):
            params = buckets.get((role, decay))
            if not params:
                continue
            groups.append(
                {
                    "name": f"{role}{'' if decay else '_no_decay'}",
                    "params": params,
                    "lr": lrs[role],
                    "initial_lr": lrs[role],
                    "weight_decay": weight_decay if decay else 0.0,
                }
            )
            log.info(
                "param group %-18s %3d tensors %12s params  lr %.2e  wd %.3g",
                groups[-1]["name"], len(params), f"{sum(p.numel() for p in params):,}", lrs[role], groups[-1]["weight_decay"],
            )
    return groups


def build_optimizer(groups: list[dict[str, Any]], betas: tuple[float, float], device: torch.device) -> torch.optim.Optimizer:
    """Torch AdamW over ``groups``, fused on CUDA."""
    return torch.optim.AdamW(groups, betas=betas, fused=device.type == "cuda")


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The job's LR schedule, scaling each group's ``initial_lr``: a linear warm-up over ``warmup_steps``,
    then ``optim.schedule`` (``linear`` / ``cosine`` decay to 0, or ``constant``) over the remaining steps.

    The decay is ``transformers.get_scheduler`` with no warm-up of its own. The warm-up is torch's
    ``LinearLR`` (joined by ``SequentialLR``): factor ``(step + 1) / warmup_steps``, so the first step
    already learns and the last warm-up step runs at the full LR, where transformers' warm-up starts at 0
    and reaches it one step later. Every part's state dict is plain data (``schedule.json``).
    """
    from torch.optim.lr_scheduler import LinearLR, SequentialLR
    from transformers import get_scheduler

    decay = get_scheduler(schedule, optimizer, num_warmup_steps=0, num_training_steps=total_steps - warmup_steps)
    if not warmup_steps:
        return decay
    warmup = LinearLR(optimizer, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=max(warmup_steps - 1, 1))
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])
