"""Speech recognition in evaluation: CTC greedy decoding, Whisper generation, transcripts back from label ids.

The ASR tasks (``engine.tasks.ctc``, ``engine.tasks.speech_seq2seq``) score decoded text with these
(:class:`engine.evaluation.metrics.AsrMetrics`): CTC logits are decoded greedily by the target tokenizer (repeats
merged, blanks dropped); sequence-to-sequence models generate with the job's language and task tokens,
as they will be used.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.preprocessing.labels import IGNORE_INDEX

PREFIX_TOKENS = 4
"""Whisper's decoder prefix (start, language, task, no-timestamps) counts against its positions."""


def decode_references(labels: torch.Tensor, tokenizer: Any, keep_repeats: bool = False) -> list[str]:
    """Label ids (padding -100) back to transcripts; ``keep_repeats``: references of a CTC vocabulary keep
    their repeated letters (its decoding would merge them)."""
    ids = labels.masked_fill(labels == IGNORE_INDEX, tokenizer.pad_token_id).tolist()
    if keep_repeats:
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
