"""Parameter groups: the backbone learns at head_lr x backbone_lr_ratio; no decay on norms and biases."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from engine.config.schema import build_job
from engine.loop.optim import build_optimizer, build_param_groups, build_scheduler
from engine.models.prepare import prepare_model

LABELS = ["food", "sport", "tech"]
BERT_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense")
TRAINED_LINEARS = [f"bert.encoder.layer.{i}.{m}" for i in (2, 3) for m in BERT_LINEARS] + ["bert.pooler.dense"]
"""The linear layers above ``freeze_depth: 2`` of a 4-block BERT."""


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny.save_tiny_model("bert", tmp_path_factory.mktemp("bert"), layers=4)


def groups_for(model_dir, **sections):
    job = build_job({"model": {"name": str(model_dir), "labels": LABELS}, "data": {"train": "x.parquet"}, **sections})
    prepared = prepare_model(job, LABELS, pad_token_id=0)
    f = job.finetune
    groups = build_param_groups(prepared.model, prepared.head_names, f.head_lr, f.backbone_lr_ratio, f.adapter_lr_ratio, job.optim.weight_decay)
    names = {id(p): n for n, p in prepared.model.named_parameters()}
    return {g["name"]: (g["lr"], g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in groups}, prepared.model


def test_backbone_lr_is_head_lr_times_ratio(bert_dir):
    groups, model = groups_for(bert_dir, finetune={"freeze_depth": 2, "head_lr": 1e-3, "backbone_lr_ratio": 0.05}, optim={"weight_decay": 0.1})
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    assert groups["head"][0] == 1e-3 and groups["head_no_decay"][0] == 1e-3
    assert groups["backbone"][0] == pytest.approx(1e-3 * 0.05) and groups["backbone_no_decay"][0] == pytest.approx(5e-5)
    assert groups["head"][2] == {"classifier.weight"} and groups["head_no_decay"][2] == {"classifier.bias"}
    # no decay on biases and LayerNorm weights; decay on matrices (blocks 2 and 3 and the pooler train)
    assert groups["backbone"][1] == 0.1 and groups["backbone_no_decay"][1] == 0.0
    assert groups["backbone"][2] == {f"{m}.weight" for m in TRAINED_LINEARS}
    assert groups["backbone_no_decay"][2] == {f"{m}.bias" for m in TRAINED_LINEARS} | {
        f"bert.encoder.layer.{i}.{norm}.LayerNorm.{p}" for i in (2, 3) for norm in ("attention.output", "output") for p in ("weight", "bias")
    }
    # frozen parameters are in no group, trainable ones in exactly one
    grouped = set().union(*(g[2] for g in groups.values()))
    assert grouped == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("bert.encoder.layer.0.") or n.startswith("bert.embeddings") for n in grouped)


def test_lora_adapters_get_their_own_group(bert_dir):
    groups, _ = groups_for(bert_dir, peft={"method": "lora"}, finetune={"head_lr": 2e-3, "adapter_lr_ratio": 0.5})
    assert set(groups) == {"head", "head_no_decay", "adapter"}
    assert groups["adapter"][0] == pytest.approx(1e-3)
    assert groups["adapter"][2] == {
        f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.default.weight"
        for i in range(4) for m in ("query", "value") for ab in "AB"
    }


def test_scheduler_applies_the_ratio_through_warmup_and_decay(bert_dir):
    _, model = groups_for(bert_dir, finetune={"head_lr": 1e-3, "backbone_lr_ratio": 0.1})
    job_groups = build_param_groups(model, ["classifier"], 1e-3, 0.1)
    optimizer = build_optimizer(job_groups, (0.9, 0.999), torch.device("cpu"))
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=2, schedule="linear")
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(0.5e-3) and lrs["backbone"] == pytest.approx(0.5e-4)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["backbone"] == pytest.approx(0.1 * lrs["head"])
    assert lrs["head"] == pytest.approx(1e-3 * 0.5)  # step 6: 4 of the 8 decay steps done


def lr_factors(total_steps: int, warmup_steps: int, schedule: str) -> list[float]:
    """The schedule's factor on the initial LR at steps 0..total_steps, as the optimizer sees it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, schedule)
    factors = []
    for _ in range(total_steps + 1):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def test_schedule_shapes():
    # warm-up: (step + 1) / warmup_steps, so step 0 learns and the last warm-up step is at the full LR
    linear = lr_factors(100, 10, "linear")
    assert linear[0] == pytest.approx(0.1) and linear[9] == pytest.approx(1.0) and linear[10] == pytest.approx(1.0)
    assert linear[55] == pytest.approx(0.5) and linear[100] == 0.0
    cosine = lr_factors(100, 10, "cosine")
    assert cosine[4] == pytest.approx(0.5) and cosine[10] == pytest.approx(1.0)
    assert cosine[55] == pytest.approx(0.5) and cosine[100] == pytest.approx(0.0, abs=1e-12)
    assert lr_factors(100, 0, "constant") == [1.0] * 101
    assert lr_factors(4, 1, "linear") == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3, 0.0])
    assert lr_factors(5, 2, "constant") == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("warmup_steps, schedule", [(3, "cosine"), (0, "linear")])
def test_schedule_state_is_plain_data_and_restores_exactly(warmup_steps, schedule):
    def build() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1e-3, "initial_lr": 1e-3}])
        return optimizer, build_scheduler(optimizer, 12, warmup_steps, schedule)

    optimizer, scheduler = build()
    for _ in range(2):  # stop inside the warm-up (or the decay without one)
        optimizer.step()
        scheduler.step()
    saved_optimizer, saved = optimizer.state_dict(), json.loads(json.dumps(scheduler.state_dict()))
    restored_optimizer, restored = build()
    restored_optimizer.load_state_dict(saved_optimizer)
    restored.load_state_dict(saved)
    for _ in range(10):
        optimizer.step(), scheduler.step(), restored_optimizer.step(), restored.step()
        assert restored_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # the last step decays to 0
