"""Parameter groups and learning-rate ratios: the only place LR ratios take effect."""

from __future__ import annotations

import logging
import math
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


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor applied to every group's ``initial_lr`` at optimizer step ``step`` (warm-up, then decay)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(1.0 - progress, 0.0)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that scales each group's ``initial_lr`` by :func:`lr_multiplier`; its state dict is plain data."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, schedule))
