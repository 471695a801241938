"""Parameter groups: the backbone learns at head_lr x backbone_lr_ratio; no decay on norms and biases."""

from __future__ import annotations

import pytest
import torch

import tiny
from engine.config.schema import build_job
from engine.loop.optim import build_optimizer, build_param_groups, build_scheduler, lr_multiplier
from engine.models.prepare import prepare_model

LABELS = ["food", "sport", "tech"]


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
    # no decay on biases and LayerNorm weights; decay on matrices
    assert groups["backbone"][1] == 0.1 and groups["backbone_no_decay"][1] == 0.0
    assert all(n.endswith("bias") or "LayerNorm" in n for n in groups["backbone_no_decay"][2])
    assert all(n.endswith("weight") and "LayerNorm" not in n for n in groups["backbone"][2])
    # frozen parameters are in no group, trainable ones in exactly one
    grouped = set().union(*(g[2] for g in groups.values()))
    assert grouped == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("bert.encoder.layer.0.") or n.startswith("bert.embeddings") for n in grouped)


def test_lora_adapters_get_their_own_group(bert_dir):
    groups, _ = groups_for(bert_dir, peft={"method": "lora"}, finetune={"head_lr": 2e-3, "adapter_lr_ratio": 0.5})
    assert set(groups) == {"head", "head_no_decay", "adapter"}
    assert groups["adapter"][0] == pytest.approx(1e-3)
    assert all("lora_" in n for n in groups["adapter"][2])


def test_scheduler_applies_the_ratio_through_warmup_and_decay(bert_dir):
    groups_info, model = groups_for(bert_dir, finetune={"head_lr": 1e-3, "backbone_lr_ratio": 0.1})
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
    assert lrs["head"] == pytest.approx(1e-3 * lr_multiplier(6, 10, 2, "linear"))


def test_lr_multiplier_shapes():
    assert lr_multiplier(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_multiplier(10, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_multiplier(100, 100, 10, "linear") == 0.0
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(90, 100, 0, "constant") == 1.0
