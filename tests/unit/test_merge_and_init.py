"""``shoulders init`` prints a job that validates, for every task; ``shoulders merge`` folds an adapter export
into its base model so that plain ``transformers`` loads it and gives the adapter's logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cluster.cli.main import main
from engine.checkpoints.export import export_checkpoint
from engine.checkpoints.store import save_checkpoint, trainable_state_dict
from engine.config.schema import build_job
from engine.models.prepare import prepare_model
from engine.tasks.base import TASK_MODULES


def init_job(task: str, model: str, tmp_path: Path, capsys) -> Path:
    assert main(["init", "--task", task, "--model", model]) == 0
    job = tmp_path / f"{task}.yaml"
    job.write_text(capsys.readouterr().out)
    return job


@pytest.mark.parametrize("task", list(TASK_MODULES))
def test_init_prints_a_job_that_validates_for_every_task(task, tmp_path, capsys):
    job = init_job(task, "org/Some-Model", tmp_path, capsys)
    raw = yaml.safe_load(job.read_text())
    assert raw["model"] == {"name": "org/Some-Model", "task": task}
    assert main(["validate", "--schema-only", str(job)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("task", ["sequence_classification", "causal_lm"])
def test_init_job_passes_every_check_once_pointed_at_data(task, tmp_path, capsys, tiny_bert, tiny_llama_lm, topic_data, lm_data):
    model, data = (tiny_bert, topic_data) if task == "sequence_classification" else (tiny_llama_lm, lm_data)
    job = init_job(task, str(model), tmp_path, capsys)
    splits = [f"data.{split}={data.get(split) or 'null'}" for split in ("train", "validation", "test")]
    code = main(["validate", str(job), *splits, f"output.dir={tmp_path / 'out'}"])
    assert code == 0, capsys.readouterr()
    assert "every check of shoulders train" in capsys.readouterr().out


def test_init_refuses_an_unknown_task(capsys):
    assert main(["init", "--task", "translation", "--model", "x"]) == 2
    assert "causal_lm" in capsys.readouterr().err


class WeightsOnly:
    def __init__(self, model: torch.nn.Module):
        self.model = model

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return trainable_state_dict(self.model)

    def save(self, folder: Path, rank: int) -> None:
        pass


def lm_adapter_export(model: Path, tmp_path: Path) -> Path:
    """A LoRA adapter export of a tiny causal LM whose adapters are not zero (LoRA's B starts at zero)."""
    job = build_job({
        "model": {"name": str(model), "task": "causal_lm"}, "data": {"train": "unused.jsonl"},
        "peft": {"method": "lora", "target_modules": ["q_proj", "v_proj"]}, "output": {"export": "adapter"},
    })
    prepared = prepare_model(job, None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in prepared.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    folder = save_checkpoint(tmp_path / "checkpoint", backend=WeightsOnly(prepared.model), rank=0, world_size=1,
                             state={"train": {"step": 1}}, job=job.model_dump(mode="json"))
    return export_checkpoint(folder, tmp_path / "adapter", None)


def test_merge_loads_with_plain_transformers_and_gives_the_adapters_logits(tiny_llama_lm, tmp_path, capsys):
    from engine.evaluation.exported import load_exported

    export = lm_adapter_export(tiny_llama_lm, tmp_path)
    assert (export / "adapter_config.json").is_file()
    out = tmp_path / "merged"
    assert main(["merge", str(export), str(out)]) == 0, capsys.readouterr().err
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    assert json.loads((out / "shoulders_job.json").read_text())["job"]["output"]["export"] == "merged"
    ids = [[1, 5, 9, 3, 7]]
    script = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
AutoTokenizer.from_pretrained({str(out)!r})
print(json.dumps(model(input_ids=torch.tensor({ids})).logits.tolist()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    merged_logits = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        adapter_logits = load_exported(export, "causal_lm", None).eval()(input_ids=torch.tensor(ids)).logits
        from transformers import AutoModelForCausalLM

        base_logits = AutoModelForCausalLM.from_pretrained(tiny_llama_lm).eval()(input_ids=torch.tensor(ids)).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-5)
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapters changed the model: the merge carried them


def test_merge_refuses_a_merged_export_and_an_existing_folder(tiny_llama_lm, tmp_path, capsys):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    assert main(["merge", str(tmp_path / "merged"), str(tmp_path / "again")]) == 2
    assert "already a merged model" in capsys.readouterr().err
    export = lm_adapter_export(tiny_llama_lm, tmp_path)
    assert main(["merge", str(export), str(tmp_path / "merged")]) == 2
    assert "already exists" in capsys.readouterr().err
