"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU workers with transfer learning: frozen bottom block, LR-ratio
groups and LoRA. A worker is SIGKILLed after step 3 and the run recovers from the step-2 checkpoint.

Checks: the LRs inside DeepSpeed's optimizer are each group's head_lr x ratio x schedule; frozen weights are
out of the optimizer and bit-identical to the pre-trained ones after the resume; the adapter export is
consolidated (full-size tensors) and loads with plain transformers + peft.
"""

from __future__ import annotations

import json

import pytest

from cluster.cli.main import main
from resume_helpers import checkpoints, final_state, write_id_data, write_job

pytestmark = [pytest.mark.slow, pytest.mark.ray]

HEAD_LR, ADAPTER_RATIO, BACKBONE_RATIO = 4e-3, 0.5, 0.25
TOTAL_STEPS, WARMUP = 4, 1  # 60 rows per worker / 8 per micro-batch / 2 micro-batches per step, 1 epoch


@pytest.fixture(scope="module")
def id_data(tmp_path_factory):
    return write_id_data(tmp_path_factory.mktemp("ds-data"))


def ds_job(model, data, out, stage: int) -> dict:
    return {
        "name": f"zero{stage}",
        "model": {"name": str(model), "labels": ["food", "sport", "tech"]},
        "data": {**data, "max_length": 16, "rows_per_block": 20, "id_column": "id"},
        "finetune": {"freeze_depth": 1, "head_lr": HEAD_LR, "adapter_lr_ratio": ADAPTER_RATIO, "backbone_lr_ratio": BACKBONE_RATIO},
        "peft": {"method": "lora", "r": 4, "target_modules": ["query", "value"]},
        "optim": {"epochs": 1, "batch_size": 8, "grad_accum": 2, "warmup_ratio": 0.25, "max_grad_norm": 1.0},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1},
        "backend": {"name": "deepspeed", "zero_stage": stage},
        "eval": {"every_n_steps": 2},
        "output": {"dir": str(out), "keep_checkpoints": 5, "export": "adapter"},
    }


def pretrained_frozen_digest(job_raw: dict) -> str:
    """The frozen weights as a worker holds them before its first step: prepared, then the job's perf
    settings applied (which may move frozen linear weights into buffers)."""
    import torch

    from engine.backends import partitions_parameters
    from engine.config.schema import build_job
    from engine.loop.faults import frozen_digest
    from engine.models.prepare import prepare_model
    from engine.perf.speed import apply_perf

    job = build_job(job_raw)
    model = prepare_model(job, job.model.labels, 0).model
    apply_perf(model, job.perf, job.model.task, torch.device("cpu"), None, keep_frozen_weights=partitions_parameters(job))
    return frozen_digest(model)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_lora_with_frozen_blocks_and_lr_ratios_recovers_from_a_killed_worker(stage, ray_local, tiny_bert, id_data, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    faults = {"kill_at_step": 3, "kill_rank": 1, "kill_marker": str(marker), "kill_delay_s": 6, "frozen_digest": True}
    monkeypatch.setenv("SHOULDERS_FAULTS", json.dumps(faults))
    raw = ds_job(tiny_bert, id_data, tmp_path / "out", stage)
    assert main(["train", write_job(tmp_path / "job.yaml", raw)]) == 0
    assert marker.exists()
    assert "checkpoint_000000004_001" in [p.name for p in checkpoints(tmp_path / "out")]  # resumed from step 2

    final = final_state(tmp_path / "out")
    # Only the head and the adapters of the unfrozen block train; block 0 and the base weights stay frozen.
    names = set(final["weights"])
    assert names and all("classifier" in n or ("lora_" in n and ".layer.1." in n) for n in names), sorted(names)
    assert any("lora_" in n for n in names) and any("classifier" in n for n in names)

    # The LRs DeepSpeed's optimizer applied at each evaluation: head_lr x group ratio x schedule (1 warm-up
    # step at full LR, then linear decay to 0 over the other 3: 2/3 after step 2, 0 after step 4).
    schedule = {2: 2 / 3, 4: 0.0}
    ratios = {"head": 1.0, "adapter": ADAPTER_RATIO, "backbone": BACKBONE_RATIO}
    history = final["state"]["train"]["history"]
    assert [h["step"] for h in history] == [2, 4]
    for entry in history:
        lrs = {k.removeprefix("lr_"): v for k, v in entry.items() if k.startswith("lr_")}
        assert {"head", "adapter"} <= set(lrs) and not any(k.startswith("backbone") for k in lrs)  # frozen: no group
        for group, lr in lrs.items():
            expected = HEAD_LR * ratios[group.removesuffix("_no_decay")] * schedule[entry["step"]]
            assert lr == pytest.approx(expected, rel=1e-9, abs=1e-12), (group, entry["step"])

    # Frozen weights after the resume are bit-identical to the pre-trained ones, on every rank.
    positions = [json.loads((final["folder"] / f"rank-{r}" / "position.json").read_text()) for r in range(2)]
    expected_digest = pretrained_frozen_digest(raw)
    assert [p["frozen_digest"] for p in positions] == [expected_digest, expected_digest]

    # The export is consolidated and loads with plain transformers + peft.
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    export = tmp_path / "out" / "model"
    adapter = load_file(export / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3)
    model = PeftModel.from_pretrained(base, str(export))
    loaded = dict(model.named_parameters())
    best = json.loads((export / "shoulders_job.json").read_text())["metrics"]["step"]
    best_weights = load_file(next(p for p in checkpoints(tmp_path / "out") if p.name.startswith(f"checkpoint_{best:09d}")) / "trainable.safetensors")
    lora = [n for n in best_weights if "lora_A" in n]
    assert lora and all(torch.equal(loaded[n], best_weights[n]) for n in lora)
