"""``shoulders merge``: an adapter export folded into its base model, as a folder plain ``transformers`` loads.

The PEFT merge itself is :func:`engine.adapters.merge_adapters`; this module loads the export as
``shoulders eval`` does (:func:`engine.evaluation.exported.load_exported`), merges, and writes the result
beside the export's tokenizer or feature extractor, with its ``shoulders_job.json`` saying ``export: merged``
(so ``shoulders eval`` and ``generate`` take it), written whole (``engine.checkpoints.atomic``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from engine.adapters import merge_adapters
from engine.checkpoints.atomic import atomic_path
from engine.checkpoints.export import JOB_FILE
from engine.errors import JobError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md", JOB_FILE)
"""Files of an adapter export that the merged folder does not carry over as they are."""


def merge_export(export_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge the adapter export in ``export_dir`` into its base model and save it to ``out_dir``.

    Raises:
        JobError: ``export_dir`` is not a shoulders adapter export, or ``out_dir`` already exists.
    """
    from engine.evaluation.exported import load_exported

    export, out = Path(export_dir), Path(out_dir)
    meta = read_export_record(export)
    if out.exists():
        raise JobError(f"shoulders merge: '{out}' already exists. Give a new folder (or remove it).")
    job, labels = meta["job"], meta.get("labels")
    model = merge_adapters(load_exported(export, job["model"]["task"], labels))
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for item in export.iterdir():  # tokenizer, feature extractor, chat template, generation config
            if item.is_file() and item.name not in ADAPTER_FILES:
                shutil.copy2(item, tmp / item.name)
        model.save_pretrained(tmp)
        job["output"] = {**job.get("output", {}), "export": "merged"}
        (tmp / JOB_FILE).write_text(json.dumps({**meta, "job": job, "merged_from": str(export.resolve())}, indent=1))
    return out


def read_export_record(export: Path) -> dict:
    """The export's ``shoulders_job.json``, after checking the folder is an adapter export."""
    if not (export / "adapter_config.json").is_file():
        what = "already a merged model (it has config.json and no adapter_config.json)" if (export / "config.json").is_file() else "not an export"
        raise JobError(f"shoulders merge: '{export}' is {what}. Give the model folder of a run with output.export: adapter.")
    try:
        meta = json.loads((export / JOB_FILE).read_text(encoding="utf-8"))
        meta["job"]["model"]["task"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise JobError(f"shoulders merge: '{export / JOB_FILE}' is missing or unreadable ({exc}); merge a folder written by shoulders train.") from None
    return meta
