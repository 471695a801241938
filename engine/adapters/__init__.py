"""PEFT wrapping, and (in :mod:`engine.adapters.fused`) the fused LoRA path. The only package that imports ``peft``.

Adapters go only into blocks above the frozen depth (``layers_to_transform``), and the new task head is
always fully trainable through ``modules_to_save``.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from engine.errors import JobError
from engine.models.blocks import BlockStack

log = logging.getLogger(__name__)

ADAPTER_MARKERS = ("lora_", "ia3_", "lora_magnitude_vector")
"""Substrings that mark a parameter as adapter weight (as opposed to a pre-trained or head weight)."""


def build_peft_config(peft_spec: Any, task_type: str | None, stack: BlockStack, n_frozen: int, head_names: list[str]) -> Any:
    """The PEFT config for a job's ``peft`` section, adapting only the blocks at or above ``n_frozen``
    (``task_type``: PEFT's name for the task's model, the task's ``peft_task_type``)."""
    from peft import IA3Config, LoraConfig

    common: dict[str, Any] = dict(
        target_modules=peft_spec.target_modules,
        modules_to_save=list(head_names) or None,
        task_type=task_type,
    )
    if n_frozen > 0:
        common.update(layers_to_transform=list(range(n_frozen, stack.depth)), layers_pattern=stack.attribute)
    if peft_spec.method == "ia3":
        return IA3Config(**common)
    return LoraConfig(
        r=peft_spec.r,
        lora_alpha=peft_spec.alpha,
        lora_dropout=peft_spec.dropout,
        use_dora=peft_spec.method == "dora",
        **common,
    )


def apply_adapters(model: nn.Module, peft_spec: Any, task_type: str | None, stack: BlockStack, n_frozen: int, head_names: list[str]) -> nn.Module:
    """Wrap ``model`` with the job's PEFT method; returns it unchanged for ``method: none``.

    When every block is frozen there is nothing to adapt, and the model stays a plain model whose head
    trains (feature extraction).
    """
    if peft_spec.method == "none" or n_frozen >= stack.depth:
        return model
    from peft import get_peft_model

    config = build_peft_config(peft_spec, task_type, stack, n_frozen, head_names)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise JobError(
            f"peft: {exc} Set peft.target_modules to the module names to adapt (e.g. [query, value]) or 'all-linear'."
        ) from None


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name belongs to PEFT adapter weights."""
    return any(marker in name for marker in ADAPTER_MARKERS)


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped by PEFT."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold adapter weights into the base weights and return the plain ``transformers`` model."""
    return model.merge_and_unload() if is_peft_model(model) else model


def tidy_adapter_config(model: nn.Module, base_name: str) -> None:
    """Make a PEFT model's saved config portable before ``save_pretrained``.

    ``base_model_name_or_path`` becomes ``base_name`` (the hub id or path the job named, not where this
    machine keeps the files); ``modules_to_save`` loses duplicates and names no module of this model has
    (PEFT's sequence-classification wrapper always adds both ``classifier`` and ``score``).
    """
    module_names = [name for name, _ in model.named_modules()]

    def present(entry: str) -> bool:
        return any(name == entry or name.endswith("." + entry) for name in module_names)

    for config in model.peft_config.values():
        config.base_model_name_or_path = base_name
        if config.modules_to_save:
            config.modules_to_save = [entry for entry in dict.fromkeys(config.modules_to_save) if present(entry)]


def load_adapter_model(base: nn.Module, adapter_dir: str) -> nn.Module:
    """Load a saved adapter folder onto ``base``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir)
