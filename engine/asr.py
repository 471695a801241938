"""Speech recognition in evaluation: CTC greedy decoding, Whisper generation, and the metrics that use them.

Metrics are computed on decoded text (:class:`engine.metrics.AsrMetrics`): CTC logits are decoded
greedily by the target tokenizer (repeats merged, blanks dropped); sequence-to-sequence models
generate with the job's language and task tokens, as they will be used.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.config import ASR_TASKS
from engine.metrics import AsrMetrics, TaskMetrics
from engine.preprocess import IGNORE_INDEX

PREFIX_TOKENS = 4
"""Whisper's decoder prefix (start, language, task, no-timestamps) counts against its positions."""


def decode_references(labels: torch.Tensor, tokenizer: Any, task: str) -> list[str]:
    """Label ids (padding -100) back to transcripts; CTC references keep their repeated letters."""
    ids = labels.masked_fill(labels == IGNORE_INDEX, tokenizer.pad_token_id).tolist()
    if task == "ctc":
        return tokenizer.batch_decode(ids, group_tokens=False, skip_special_tokens=True)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def decode_ctc(logits: torch.Tensor, tokenizer: Any) -> list[str]:
    """Greedy CTC decoding: argmax per frame, repeats merged, then the blank (pad) dropped by the tokenizer."""
    return tokenizer.batch_decode(logits.argmax(dim=-1).tolist())


def generation_kwargs(model: Any, job: Any) -> dict[str, Any]:
    """Language/task tokens (for models that have them, e.g. Whisper) and the new-token budget."""
    inner = getattr(model, "module", model)
    config, generation = inner.config, inner.generation_config
    kwargs: dict[str, Any] = {}
    if getattr(generation, "task_to_id", None):
        kwargs["task"] = job.model.asr_task
    if job.model.language and getattr(generation, "lang_to_id", None):
        kwargs["language"] = job.model.language
    max_target = getattr(config, "max_target_positions", None)
    # a length (prefix included) rather than max_new_tokens, which clashes with the checkpoint's max_length
    kwargs["max_length"] = min(job.data.max_length + PREFIX_TOKENS, max_target) if max_target else job.data.max_length + 1
    backend = getattr(job, "backend", None)
    if backend is not None and backend.name == "deepspeed" and backend.zero_stage == 3 and torch.distributed.is_initialized():
        kwargs["synced_gpus"] = True  # ZeRO-3 gathers parameters in every forward: all ranks decode in step
    return kwargs


@torch.no_grad()
def generate_transcripts(model: Any, batch: dict[str, torch.Tensor], tokenizer: Any, job: Any, amp_dtype: torch.dtype | None = None) -> list[str]:
    """Generate transcripts for a batch of audio features (greedy), decoded without special tokens."""
    inner = getattr(model, "module", model)
    inputs = {k: batch[k] for k in ("input_features", "input_values", "attention_mask") if k in batch}
    device_type = next(iter(inputs.values())).device.type
    ctx = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else torch.autocast(device_type, enabled=False)
    with ctx:
        ids = inner.generate(**inputs, **generation_kwargs(inner, job))
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def build_metrics(job: Any, num_labels: int | None, device: torch.device, model: Any = None, amp_dtype: torch.dtype | None = None,
                  tokenizer: Any = None) -> TaskMetrics | AsrMetrics:
    """The metrics of one evaluation pass for the job's task (ASR: WER and CER on decoded text).

    Args:
        job: the validated job.
        num_labels: classes of classification tasks.
        device: where metric states live.
        model: the model under evaluation (sequence-to-sequence ASR generates with it).
        amp_dtype: autocast dtype for generation.
        tokenizer: the target tokenizer; left empty, the job's.
    """
    task = job.model.task
    if task not in ASR_TASKS:
        return TaskMetrics(task, num_labels, device)
    if tokenizer is None:
        from engine.models.speech import job_tokenizer

        tokenizer = job_tokenizer(job)

    def references(labels: torch.Tensor) -> list[str]:
        return decode_references(labels, tokenizer, task)

    def predictions(outputs: Any, batch: dict[str, torch.Tensor]) -> list[str]:
        if task == "ctc":
            return decode_ctc(outputs.logits, tokenizer)
        return generate_transcripts(model, batch, tokenizer, job, amp_dtype)

    return AsrMetrics(predictions, references, device)


def export_metrics(job: Any, model: Any, export_dir: str | Any, device: str) -> AsrMetrics | None:
    """ASR metrics for an exported model folder, decoding with the tokenizer saved in it (None for other tasks)."""
    if job.model.task not in ASR_TASKS:
        return None
    from engine.models.speech import load_target_tokenizer

    tokenizer = load_target_tokenizer(str(export_dir), None, job.model.language, job.model.asr_task)
    return build_metrics(job, None, torch.device(device), model, None, tokenizer)
