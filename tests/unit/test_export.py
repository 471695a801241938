"""Exports load in a clean ``transformers`` + ``peft`` process with the label names, and name the base model as the job did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from engine.checkpoints.export import export_checkpoint
from engine.checkpoints.store import save_checkpoint, trainable_state_dict
from engine.config.schema import build_job
from engine.models.prepare import prepare_model

LABELS = ["food", "sport", "tech"]


class WeightsOnly:
    """The part of a backend a checkpoint needs: the trainable weights, nothing backend-specific."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return trainable_state_dict(self.model)

    def save(self, folder: Path, rank: int) -> None:
        pass


def adapter_export(tiny_bert: Path, tmp_path: Path) -> Path:
    job = build_job({
        "model": {"name": str(tiny_bert), "task": "sequence_classification"},
        "data": {"train": "unused.parquet"},
        "peft": {"method": "lora", "target_modules": ["query", "value"]},
        "output": {"export": "adapter"},
    })
    prepared = prepare_model(job, LABELS, pad_token_id=0)
    folder = save_checkpoint(
        tmp_path / "checkpoint", backend=WeightsOnly(prepared.model), rank=0, world_size=1,
        state={"train": {"step": 1}}, job=job.model_dump(mode="json"),
    )
    return export_checkpoint(folder, tmp_path / "model", LABELS)


def test_adapter_export_is_portable_and_loads_with_label_names_in_a_clean_process(tiny_bert, tmp_path):
    out = adapter_export(tiny_bert, tmp_path)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["classifier"]
    assert adapter["base_model_name_or_path"] == str(tiny_bert)
    script = f"""
import json, torch
from transformers import AutoConfig, AutoModelForSequenceClassification
from peft import PeftConfig, PeftModel
out = {str(out)!r}
config = AutoConfig.from_pretrained(out)
base = AutoModelForSequenceClassification.from_pretrained(PeftConfig.from_pretrained(out).base_model_name_or_path, config=config)
model = PeftModel.from_pretrained(base, out)
print(json.dumps({{"id2label": model.config.id2label, "logits": list(model(input_ids=torch.tensor([[2, 7, 3]])).logits.shape)}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["id2label"] == {"0": "food", "1": "sport", "2": "tech"}
    assert loaded["logits"] == [1, 3]
