"""Model surgery as plain functions: replace the head, freeze the bottom blocks, summarise what trains.

Order (fixed, documented in the README): load -> :func:`replace_head` -> :func:`freeze_bottom_blocks`
-> ``engine.adapters.apply_adapters`` -> ``engine.loop.optim.build_param_groups``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from engine.models.blocks import BlockStack

log = logging.getLogger(__name__)


@torch.no_grad()
def replace_head(model: nn.Module, head_names: list[str], seed: int) -> nn.Module:
    """Give the task head fresh weights, whatever the checkpoint held there.

    Linear layers get N(0, initializer_range) weights and zero biases, norms get ones and zeros, drawn
    from a generator seeded with ``seed`` so every worker builds the same head.
    """
    std = getattr(model.config, "initializer_range", None) or 0.02
    generator = torch.Generator().manual_seed(seed)
    for head_name in head_names:
        for module in getattr(model, head_name).modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
    return model


def parameter_regions(model: nn.Module, stack: BlockStack, head_names: list[str]) -> dict[str, str]:
    """Which part of the model each parameter belongs to: ``embeddings``, ``block.<i>``, ``top`` or ``head``.

    ``embeddings`` is everything registered before the first block, ``top`` everything after it that is
    neither a block nor the head (final norm, pooler, a language-model head).
    """
    regions: dict[str, str] = {}
    seen_block = False
    for name, _ in model.named_parameters():
        if any(name == h or name.startswith(h + ".") for h in head_names):
            regions[name] = "head"
        elif name.startswith(stack.path + "."):
            seen_block = True
            regions[name] = f"block.{int(name[len(stack.path) + 1:].split('.')[0])}"
        else:
            regions[name] = "top" if seen_block else "embeddings"
    return regions


def freeze_bottom_blocks(
    model: nn.Module,
    stack: BlockStack,
    n_frozen: int,
    head_names: list[str],
    freeze_embeddings: bool | None = None,
) -> nn.Module:
    """Freeze the bottom ``n_frozen`` blocks; everything else stays trainable.

    The embeddings are frozen whenever any block is (or as ``freeze_embeddings`` says). When every block
    is frozen, the parameters above the stack that are not the head (final norm, pooler) are frozen too,
    so only the head learns: feature extraction.
    """
    if freeze_embeddings is None:
        freeze_embeddings = n_frozen > 0
    regions = parameter_regions(model, stack, head_names)
    for name, param in model.named_parameters():
        region = regions[name]
        if region.startswith("block."):
            param.requires_grad_(int(region.split(".")[1]) >= n_frozen)
        elif region == "embeddings":
            param.requires_grad_(not freeze_embeddings)
        elif region == "top":
            param.requires_grad_(n_frozen < stack.depth)
        else:
            param.requires_grad_(True)
    return model


def _frozen_norm_stays_eval(module: nn.Module, args: Any) -> None:
    if module.training and not any(p.requires_grad for p in module.parameters(recurse=False)):
        module.training = False  # use and keep the pre-trained running statistics


def keep_frozen_norm_statistics(model: nn.Module) -> list[str]:
    """Batch norms whose parameters are frozen keep their pre-trained running statistics in training.

    ``model.train()`` would otherwise let every batch norm of a frozen block (ResNet, EfficientNet)
    re-estimate its mean and variance from the new data, changing the frozen features under a
    linear probe. A forward pre-hook puts each such norm in eval mode while its parameters are frozen, so a
    norm that gradual unfreezing makes trainable goes back to batch statistics at the next ``train()``.
    Returns the names of the hooked norms.
    """
    hooked = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.register_forward_pre_hook(_frozen_norm_stays_eval)
            hooked.append(name)
    return hooked


def trainable_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts, in total and per top-level module, and log them."""
    summary: dict[str, dict[str, int]] = defaultdict(lambda: {"trainable": 0, "frozen": 0})
    for name, param in model.named_parameters():
        key = "trainable" if param.requires_grad else "frozen"
        summary["total"][key] += param.numel()
    total = summary["total"]
    share = total["trainable"] / max(total["trainable"] + total["frozen"], 1)
    log.info("parameters: %s trainable, %s frozen (%.2f%% trainable)", f"{total['trainable']:,}", f"{total['frozen']:,}", 100 * share)
    return dict(summary)


FEATURE_ENCODER_NAMES = ("feature_extractor", "conv1", "conv2")
"""Module names of speech models' convolutional front ends: wav2vec2/HuBERT/WavLM ``feature_extractor``
(the conv stack over the waveform), Whisper's encoder ``conv1``/``conv2`` (over the log-mel spectrogram)."""


def freeze_feature_encoder(model: nn.Module) -> list[str]:
    """Freeze the convolutional feature encoder of a speech model, separately from its transformer blocks.

    Returns the names of the frozen modules (empty for models without one, e.g. text models). The
    wav2vec2 family's own ``_freeze_parameters`` is used where present, so its forward also skips the
    gradient bookkeeping of the frozen stack.
    """
    frozen = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in FEATURE_ENCODER_NAMES or isinstance(module, nn.ModuleList):
            continue
        if name.endswith(("conv1", "conv2")) and ".encoder." not in f".{name}":
            continue
        if hasattr(module, "_freeze_parameters"):
            module._freeze_parameters()
        else:
            module.requires_grad_(False)
        frozen.append(name)
    if frozen:
        log.info("froze the feature encoder: %s", ", ".join(frozen))
    return frozen
