"""Transfer safeguards without Ray (the verdicts: test_transfer_verdict.py): CKA, retention probe, gradual unfreezing, forgetting order."""

from __future__ import annotations

import pytest
import torch

import tiny
from engine.config.schema import build_job
from engine.errors import JobError
from engine.loop.optim import build_optimizer, build_param_groups
from engine.models.prepare import prepare_model
from engine.safeguards.guards import GradualUnfreezer, RetentionProbe, Safeguards, linear_cka, set_dropout, token_dropout

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
    from engine.safeguards.guards import forgetting_measure

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


def train_steps(job, data, steps=30, drift_texts=None):
    """A plain loop over the engine's own model preparation and LR groups (what engine.loop does per step)."""
    prepared = prepare_model(job, LABELS)
    model = prepared.model
    from engine.models.loading import load_tokenizer

    tokenizer = load_tokenizer(job.model.name)
    guard = Safeguards(job, model, prepared.stack, prepared.n_frozen, prepared.head_names, steps_per_epoch=10)
    guard.start(model, tiny.corpus()[:32], tokenizer, torch.device("cpu"), drift_texts)
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


def test_with_retention_data_drift_on_target_rows_is_reported_beside_forgetting(tiny_bert, tmp_path, topic_rows):
    """Forgetting on the retention set and drift (1 - CKA) on a few target rows, each from its own rows."""
    job = job_for(tiny_bert, tmp_path, finetune={"strategy": "full", "head_lr": 3e-3, "backbone_lr_ratio": 1.0},
                  safeguards={"retention_data": str(tmp_path / "general.parquet")})
    texts = topic_rows[0][:8]
    metrics, _, model = train_steps(job, topic_rows, steps=5, drift_texts=texts)
    assert metrics["forgetting"] > 0 and metrics["drift"] > 0 and metrics["forgetting"] != metrics["drift"]
    # the drift is 1 - linear CKA of the trained model's pooled features on those rows against the pre-trained one's
    from engine.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_bert))
    probe = RetentionProbe(texts, tokenizer, "cka", 16, torch.device("cpu"))
    probe.start(prepare_model(job, LABELS).model)
    assert metrics["drift"] == pytest.approx(1.0 - linear_cka(probe.reference, probe._measure(model)), abs=1e-9)


def test_drift_rows_are_the_first_validation_rows_and_only_beside_retention_data(tiny_bert, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.safeguards.guards import DRIFT_ROWS, read_drift_texts

    rows = [f"row {i}" for i in range(DRIFT_ROWS + 8)]
    pq.write_table(pa.table({"text": rows, "label": ["food"] * len(rows)}), tmp_path / "validation.parquet")
    pq.write_table(pa.table({"text": ["general text"]}), tmp_path / "general.parquet")
    splits = {"train": ([str(tmp_path / "validation.parquet")], "parquet"), "validation": ([str(tmp_path / "validation.parquet")], "parquet")}
    with_retention = job_for(tiny_bert, tmp_path, safeguards={"retention_data": str(tmp_path / "general.parquet")})
    assert read_drift_texts(with_retention, splits) == rows[:DRIFT_ROWS]
    assert read_drift_texts(job_for(tiny_bert, tmp_path), splits) is None  # the retention probe runs on these rows itself
    off = job_for(tiny_bert, tmp_path, safeguards={"retention_data": str(tmp_path / "general.parquet"), "track_forgetting": False})
    assert read_drift_texts(off, splits) is None


def test_mask_tokens_masks_a_fixed_share_of_real_tokens_never_special_or_padding(tmp_path):
    from engine.models.loading import load_tokenizer
    from engine.safeguards.guards import mask_tokens

    path = tiny.save_tiny_model("bert", tmp_path / "mlm", task="masked_lm")
    tokenizer = load_tokenizer(str(path))
    texts = ["apple bread cheese soup rice pasta salad butter honey sugar", "disk kernel"]  # 10 and 2 words
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    out = mask_tokens(dict(batch), tokenizer, torch.Generator().manual_seed(0))
    masked = out["input_ids"] == tokenizer.mask_token_id
    assert masked.sum(1).tolist() == [2, 1]  # ceil(0.15 x 10), ceil(0.15 x 2)
    assert torch.equal(out["labels"] != -100, masked)
    assert torch.equal(out["labels"][masked], batch["input_ids"][masked])
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert not (masked & (special | (batch["attention_mask"] == 0))).any()
    again = mask_tokens(dict(batch), tokenizer, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], out["input_ids"])  # a fixed mask: the same positions every evaluation


def test_a_bert_saved_with_its_masked_lm_head_measures_forgetting_as_masked_lm_loss(tmp_path, tiny_bert):
    """auto picks mlm_loss for a *ForMaskedLM checkpoint; at step 0 the probe's loss is exactly the masked LM's own
    loss on the same masked rows; it rises when the fine-tuned encoder moves; a checkpoint without the head falls back."""
    import transformers

    from engine.models.loading import load_tokenizer
    from engine.safeguards.guards import forgetting_measure, mask_tokens

    path = tiny.save_tiny_model("bert", tmp_path / "mlm", task="masked_lm")
    tokenizer = load_tokenizer(str(path))
    texts = [" ".join(tiny.WORDS[topic]) for topic in sorted(tiny.WORDS)] * 8  # fixed sentences: learnable in context
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(str(path))
    encoded = dict(tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt"))
    optimizer = torch.optim.AdamW(mlm.parameters(), lr=1e-2)
    for step in range(40):  # a source objective worth forgetting, on fresh masks each step
        mlm(**mask_tokens(encoded, tokenizer, torch.Generator().manual_seed(step))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    mlm.save_pretrained(path)
    job = job_for(path, tmp_path, safeguards={"retention_data": str(tmp_path / "general.parquet")})
    assert forgetting_measure(job) == "mlm_loss"
    assert forgetting_measure(job_for(tiny_bert, tmp_path)) == "cka"  # MiniLM-like: an encoder saved without the head
    prepared = prepare_model(job, LABELS)
    guard = Safeguards(job, prepared.model, prepared.stack, prepared.n_frozen, prepared.head_names, 10)
    guard.start(prepared.model, texts, tokenizer, torch.device("cpu"))
    assert guard.probe.measure == "mlm_loss"
    # step 0: the classifier's encoder is the masked LM's, so the loss through the kept head is the masked LM's own
    mlm.eval()
    with torch.no_grad():
        own = [(float(mlm(**b).loss), int((b["labels"] != -100).sum())) for b in guard.probe.batches]
    assert guard.probe.reference == pytest.approx(sum(l * n for l, n in own) / sum(n for _, n in own), rel=1e-5)
    assert guard.probe.reference < 1.0  # trained: well below ln(vocab) = 3.9
    assert guard.on_eval(prepared.model, {})["forgetting"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in prepared.stack.blocks.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    out = guard.on_eval(prepared.model, {})
    assert out["forgetting"] > 0.1 and out["retention_loss"] == pytest.approx(guard.probe.reference + out["forgetting"])
    # asked for mlm_loss on an encoder saved without the head: no trained head to load, CKA instead
    forced = job_for(tiny_bert, tmp_path, safeguards={"retention_data": str(tmp_path / "general.parquet"), "forgetting_measure": "mlm_loss"})
    plain = prepare_model(forced, LABELS)
    fallback = Safeguards(forced, plain.model, plain.stack, plain.n_frozen, plain.head_names, 10)
    fallback.start(plain.model, texts, load_tokenizer(str(tiny_bert)), torch.device("cpu"))
    assert fallback.probe.measure == "cka"
