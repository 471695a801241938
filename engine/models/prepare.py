"""The fixed preparation order: load -> new (or kept, ``model.head``) head -> freeze bottom blocks -> adapters."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.adapters import apply_adapters
from engine.config.schema import JobSpec
from engine.models.blocks import BlockStack, find_block_stack, resolve_freeze_depth
from engine.errors import JobError
from engine.models.loading import checkpoint_head_fits, head_module_names, load_pretrained
from engine.tasks import get_task
from engine.models.surgery import (
    freeze_bottom_blocks, freeze_feature_encoder, keep_frozen_norm_statistics, replace_head, trainable_summary,
)

log = logging.getLogger(__name__)


@dataclass
class PreparedModel:
    """A model ready for the optimizer, with what later steps need to know about it."""

    model: nn.Module
    stack: BlockStack
    n_frozen: int
    head_names: list[str]


def prepare_model(job: JobSpec, labels: list[str] | None, pad_token_id: int | None = None, *, model: Any = None) -> PreparedModel:
    """Build the job's model in the documented order; every worker gets identical weights.

    Args:
        job: the validated job.
        labels: class names (classification tasks).
        pad_token_id: the tokenizer's pad id.
        model: an already-loaded model to prepare instead of loading ``job.model.name``.
    """
    torch.manual_seed(job.seed)
    task = get_task(job.model.task)
    if model is not None:  # nothing tells which of its weights came from a checkpoint: auto makes a new head
        fresh_keys = set() if job.model.head == "keep" else {name for name, _ in model.named_parameters()}
    else:
        model, fresh_keys = load_pretrained(
            job.model.name,
            task,
            labels,
            revision=job.model.revision,
            from_scratch=job.model.from_scratch,
            pad_token_id=pad_token_id,
            config_overrides=lambda config: task.config_overrides(job, config),
        )
    head_names = head_module_names(model, task)
    if not keep_checkpoint_head(job, labels, head_names, fresh_keys, model):
        replace_head(model, head_names, job.seed)
    stack = find_block_stack(model, prefer=task.freeze_stack)
    n_frozen = resolve_freeze_depth(job.finetune.freeze_depth, stack.depth)
    freeze_bottom_blocks(model, stack, n_frozen, head_names, job.finetune.freeze_embeddings)
    if job.finetune.freeze_feature_encoder:
        freeze_feature_encoder(model)
    keep_frozen_norm_statistics(model)
    model = apply_adapters(model, job.peft, task.peft_task_type, stack, n_frozen, head_names)
    trainable_summary(model)
    return PreparedModel(model=model, stack=stack, n_frozen=n_frozen, head_names=head_names)


def keep_checkpoint_head(job: JobSpec, labels: list[str] | None, head_names: list[str], fresh_keys: set[str], model: Any) -> bool:
    """``model.head``: keep the checkpoint's task head (``keep``, or ``auto`` when it fits) or make a new one.

    Raises:
        JobError: ``keep`` on a checkpoint whose head does not fit.
    """
    if job.model.head == "new" or job.model.from_scratch or not head_names:
        return False
    from engine.models.speech import tokenizer_name

    fits, why = checkpoint_head_fits(
        job.model.name, get_task(job.model.task), labels, head_names, fresh_keys, model,
        revision=job.model.revision, own_tokenizer=_same_place(tokenizer_name(job), job.model.name),
    )
    if job.model.head == "keep" and not fits:
        raise JobError(f"model.head is keep, but the head of '{job.model.name}' cannot be kept: {why}. Use model.head: new (or auto).")
    log.info("task head %s: %s", "kept from the checkpoint" if fits else "new", why)
    return fits


def _same_place(a: str, b: str) -> bool:
    """Whether two model references name the same hub id or local folder."""
    import os

    return a == b or os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
