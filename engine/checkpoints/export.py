"""Exporting the best checkpoint as a folder that plain ``transformers`` / ``peft`` load."""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.adapters import is_peft_model, merge_adapters, tidy_adapter_config
from engine.checkpoints.atomic import atomic_path
from engine.checkpoints.store import load_trainable_state, read_checkpoint
from engine.config.schema import JobSpec
from engine.models.prepare import prepare_model
from engine.tasks import get_task

JOB_FILE = "shoulders_job.json"
"""The job that produced an export, stored beside the weights (``shoulders eval`` reads it)."""


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, labels: list[str] | None) -> Path:
    """Rebuild the job's model, load the checkpoint's trainable weights and save it to ``out_dir``.

    ``output.export: merged`` writes a plain model (adapters folded in, safetensors);
    ``adapter`` writes a PEFT adapter folder (with the new head in ``modules_to_save``) that names the base
    model as the job did, and the base model's ``config.json`` beside it, which carries the label names
    (``AutoConfig.from_pretrained(folder)``). The tokenizer is saved beside it. Written to a temporary
    folder and renamed into place.
    """
    saved = read_checkpoint(checkpoint_dir)
    job = JobSpec.model_validate(saved["job"])
    preprocessors, pad_token_id = get_task(job.model.task).preprocessors(job)
    prepared = prepare_model(job, labels, pad_token_id)
    load_trainable_state(prepared.model, saved["weights"])
    model = prepared.model if job.output.export == "adapter" else merge_adapters(prepared.model)
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        if is_peft_model(model):
            tidy_adapter_config(model, job.model.name)
            model.get_base_model().config.save_pretrained(tmp)
        model.save_pretrained(tmp)
        for preprocessor in preprocessors:
            preprocessor.save_pretrained(tmp)
        (tmp / JOB_FILE).write_text(json.dumps({"job": saved["job"], "labels": labels, "metrics": saved["state"].get("metrics")}, indent=1))
    return out
