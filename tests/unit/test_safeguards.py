"""Transfer safeguards without Ray (the verdicts: test_transfer_verdict.py): CKA, retention probe, gradual unfreezing, forgetting order."""

from __future__ import annotations

import pytest
import torch

import tiny
from engine.config import build_job
from engine.errors import JobError
from engine.models.prepare import prepare_model
from engine.optim import build_optimizer, build_param_groups
from engine.safeguards import GradualUnfreezer, RetentionProbe, Safeguards, linear_cka, set_dropout, token_dropout

LABELS = ["food", "sport", "tech"]


def job_for(model_path, tmp_path, **sections):
    raw = {"model": {"name": str(model_path), "labels": LABELS}, "data": {"train": "x.parquet", "max_length": 16},
           "output": {"dir": str(tmp_path)}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return build_job(raw)


# --- forgetting --------------------------------------------------------------------------------------

def test_linear_cka_is_one_for_rotations_and_low_for_unrelated():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(64, 16, generator=g)) < 0.5


@pytest.mark.parametrize("kind, task, measure", [("bert", "sequence_classification", "cka"), ("llama", "causal_lm", "lm_loss")])
def test_retention_probe_is_zero_at_start_and_rises_when_the_backbone_moves(tmp_path, kind, task, measure):
    path = tiny.save_tiny_model(kind, tmp_path / kind, task=task)
    job = job_for(path, tmp_path, model={"task": task, "labels": LABELS if task != "causal_lm" else None})
    assert job.safeguards.forgetting_measure == "auto"
    from engine.safeguards import forgetting_measure

    assert forgetting_measure(job) == measure
    prepared = prepare_model(job, LABELS if task != "causal_lm" else None)
    from engine.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(path))
    if measure == "lm_loss":  # give the random tiny LM a source objective worth forgetting
        batch = tokenizer(tiny.corpus()[:24], truncation=True, max_length=16, padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        optimizer = torch.optim.AdamW(prepared.model.parameters(), lr=1e-2)
        for _ in range(30):
            prepared.model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    probe = RetentionProbe(tiny.corpus()[:24], tokenizer, measure, 16, torch.device("cpu"))
    probe.start(prepared.model)
    assert probe.delta(prepared.model)["forgetting"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in prepared.stack.blocks.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert probe.delta(prepared.model)["forgetting"] > 0.01


def train_steps(job, data, steps=30):
    """A plain loop over the engine's own model preparation and LR groups (what engine.loop does per step)."""
    prepared = prepare_model(job, LABELS)
    model = prepared.model
    from engine.models.loading import load_tokenizer

    tokenizer = load_tokenizer(job.model.name)
    guard = Safeguards(job, model, prepared.stack, prepared.n_frozen, prepared.head_names, steps_per_epoch=10)
    guard.start(model, tiny.corpus()[:32], tokenizer, torch.device("cpu"))
    with guard.param_groups_scope(model):
        groups = build_param_groups(model, prepared.head_names, job.finetune.head_lr, job.finetune.backbone_lr_ratio, 1.0, 0.01)
    optimizer = build_optimizer(groups, (0.9, 0.999), torch.device("cpu"))
    texts, labels = data
    seen = []
    for step in range(steps):
        if guard.unfreeze_due(step):
            guard.unfreeze(model, step)
        seen.append({n for n, p in model.named_parameters() if p.requires_grad})
        i = (step * 16) % len(texts)
        batch = tokenizer(texts[i:i + 16], truncation=True, max_length=16, padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(labels[i:i + 16])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return guard.on_eval(model, {"train_loss": 1.0, "val_loss": 1.2}), seen, model


@pytest.fixture(scope="module")
def topic_rows():
    import random

    rng = random.Random(0)
    labels = [rng.randrange(3) for _ in range(160)]
    texts = [" ".join(rng.choice(tiny.WORDS[LABELS[y]] if rng.random() < 0.4 else tiny.FILLER) for _ in range(10)) for y in labels]
    return texts, labels


def test_forgetting_rises_with_the_backbone_lr_ratio(tiny_bert, tmp_path, topic_rows):
    """Item 4 of the issue, without Ray: same job, same seed, only finetune.backbone_lr_ratio differs."""
    deltas = {}
    for ratio in (0.01, 1.0):
        job = job_for(tiny_bert, tmp_path, finetune={"strategy": "full", "head_lr": 3e-3, "backbone_lr_ratio": ratio})
        metrics, _, _ = train_steps(job, topic_rows)
        assert "forgetting" not in metrics  # no retention_data: the probe ran on target rows, which is drift
        deltas[ratio] = metrics["drift"]
    assert 0.0 <= deltas[0.01] < deltas[1.0]
    assert deltas[1.0] > 3 * deltas[0.01]


# --- gradual unfreezing ------------------------------------------------------------------------------

def region_of(name):
    if name.startswith("bert.encoder.layer."):
        return f"block.{name.split('.')[3]}"
    return "head" if name.startswith("classifier") else ("top" if name.startswith("bert.pooler") else "embeddings")


def test_gradual_unfreezing_grows_the_trainable_set_on_schedule(tiny_bert, tmp_path, topic_rows):
    job = job_for(tiny_bert, tmp_path, finetune={"freeze_depth": "all", "head_lr": 3e-3, "backbone_lr_ratio": 0.5},
                  safeguards={"unfreeze_every_steps": 4})
    before = {n: p.detach().clone() for n, p in prepare_model(job, LABELS).model.named_parameters()}
    metrics, seen, model = train_steps(job, topic_rows, steps=10)
    regions = [sorted({region_of(n) for n in names}) for names in seen]
    assert regions[0] == regions[3] == ["head"]                                    # steps 0-3: feature extraction
    assert regions[4] == regions[7] == ["block.1", "head", "top"]                  # step 4: the top block and pooler
    assert regions[8] == regions[9] == ["block.0", "block.1", "embeddings", "head", "top"]  # step 8: everything
    assert metrics["frozen_blocks"] == 0
    after = dict(model.named_parameters())
    moved = {region_of(n) for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    assert moved == {"head", "top", "block.1", "block.0", "embeddings"}


def test_unfrozen_blocks_join_the_backbone_group_and_frozen_ones_stay_untouched(tiny_bert, tmp_path, topic_rows):
    job = job_for(tiny_bert, tmp_path, finetune={"freeze_depth": "all", "head_lr": 3e-3, "backbone_lr_ratio": 0.5},
                  safeguards={"unfreeze_every_steps": 100})
    prepared = prepare_model(job, LABELS)
    unfreezer = GradualUnfreezer(prepared.stack, prepared.head_names, prepared.n_frozen, 100)
    with unfreezer.all_unfrozen(prepared.model):
        groups = build_param_groups(prepared.model, prepared.head_names, 1e-3, 0.5, 1.0, 0.01)
    backbone = {id(p) for g in groups if g["name"].startswith("backbone") for p in g["params"]}
    blocks = {id(p) for p in prepared.stack.blocks.parameters()}
    assert blocks <= backbone and all(g["lr"] == 5e-4 for g in groups if g["name"].startswith("backbone"))
    assert not any(p.requires_grad for p in prepared.stack.blocks.parameters())  # frozen again after building
    # with weight decay on, a frozen block in the optimizer does not move (it has no gradient)
    _, _, model = train_steps(job, topic_rows, steps=3)
    start = prepare_model(job, LABELS).model
    assert torch.equal(model.bert.encoder.layer[0].output.dense.weight, start.bert.encoder.layer[0].output.dense.weight)


def test_unfreezing_every_epochs_counts_steps_per_epoch(tiny_bert, tmp_path):
    job = job_for(tiny_bert, tmp_path, finetune={"freeze_depth": 2}, safeguards={"unfreeze_every_epochs": 2})
    prepared = prepare_model(job, LABELS)
    guard = Safeguards(job, prepared.model, prepared.stack, prepared.n_frozen, prepared.head_names, steps_per_epoch=5)
    assert [guard.unfreezer.frozen_at(s) for s in (0, 9, 10, 19, 20, 100)] == [2, 2, 1, 1, 0, 0]


def test_gradual_unfreezing_with_adapters_or_two_schedules_is_refused(tiny_bert, tmp_path):
    with pytest.raises(JobError, match="peft.method"):
        job_for(tiny_bert, tmp_path, finetune={"strategy": "lora"}, safeguards={"unfreeze_every_steps": 3})
    with pytest.raises(JobError, match="not both"):
        job_for(tiny_bert, tmp_path, safeguards={"unfreeze_every_steps": 3, "unfreeze_every_epochs": 1})


# --- overfitting -------------------------------------------------------------------------------------

def test_dropout_and_token_dropout(tiny_bert, tmp_path):
    job = job_for(tiny_bert, tmp_path, safeguards={"dropout": 0.3, "token_dropout": 0.5})
    prepared = prepare_model(job, LABELS)
    Safeguards(job, prepared.model, prepared.stack, prepared.n_frozen, prepared.head_names, 10)
    rates = {m.p for m in prepared.model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.3} and set_dropout(prepared.model, 0.1) > 0
    batch = {"input_ids": torch.ones(8, 20, dtype=torch.long), "attention_mask": torch.ones(8, 20, dtype=torch.long)}
    out = token_dropout(batch, 0.5, torch.Generator().manual_seed(0))
    kept = out["attention_mask"].float().mean().item()
    assert 0.3 < kept < 0.7 and bool(out["attention_mask"][:, 0].all())
    assert token_dropout(batch, 0.0, torch.Generator()) is batch


def test_train_val_gap_and_forgetting_limit_stop(tiny_bert, tmp_path, topic_rows):
    job = job_for(tiny_bert, tmp_path, finetune={"strategy": "full", "head_lr": 3e-3, "backbone_lr_ratio": 1.0},
                  safeguards={"max_forgetting": 1e-4})
    prepared = prepare_model(job, LABELS)
    from engine.models.loading import load_tokenizer

    guard = Safeguards(job, prepared.model, prepared.stack, prepared.n_frozen, prepared.head_names, 10)
    guard.start(prepared.model, tiny.corpus()[:16], load_tokenizer(str(tiny_bert)), torch.device("cpu"))
    metrics = guard.on_eval(prepared.model, {"train_loss": 0.2, "val_loss": 0.9})
    assert metrics["train_val_gap"] == pytest.approx(0.7) and guard.stop_reason is None
    with torch.no_grad():
        for p in prepared.stack.blocks.parameters():
            p.add_(torch.randn_like(p))
    guard.on_eval(prepared.model, {})
    assert guard.stop_reason and "max_forgetting" in guard.stop_reason


def test_retention_data_measures_forgetting_target_rows_measure_drift(tiny_bert, tmp_path, topic_rows):
    job = job_for(tiny_bert, tmp_path, finetune={"strategy": "full", "head_lr": 3e-3, "backbone_lr_ratio": 1.0},
                  safeguards={"retention_data": str(tmp_path / "general.parquet")})
    metrics, _, _ = train_steps(job, topic_rows, steps=5)
    assert metrics["forgetting"] > 0 and "drift" not in metrics
