"""The transfer verdict end to end on a local Ray with tiny models, and validation that counts every row.

- a backbone whose source never told the target's topic words apart (their embeddings are one vector)
  fine-tuned with its embeddings frozen loses to its fair scratch twin: *negative transfer*;
- training labels shuffled: the pre-trained model does not beat chance: *no signal*. Judged against chance and
  the majority class alone (no twin): the twin's run, settings and score in a verdict are checked above, and
  ``tests/unit/test_transfer_verdict.py`` checks that a twin below the threshold too keeps the verdict *no signal*.

Validation that counts every row (75 rows on two workers) is checked in ``test_train_e2e.py``'s two-worker run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import tiny
from cluster.cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]
LABELS = ["food", "sport", "tech"]


def job_file(tmp_path: Path, model: Path, splits: dict[str, Path], **sections) -> str:
    raw = {
        "name": "verdict",
        "model": {"name": str(model), "labels": LABELS},
        "data": {**{k: str(v) for k, v in splits.items()}, "max_length": 16, "rows_per_block": 16},
        "finetune": {"head_lr": 1e-2, "backbone_lr_ratio": 0.5},
        "optim": {"epochs": 3, "batch_size": 16, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.45},
        "safeguards": {"track_forgetting": False},
        "output": {"dir": str(tmp_path / "out")},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def topic_blind_backbone(tmp_path_factory) -> Path:
    """A tiny BERT whose word embeddings give every topic word one shared vector (their mean): what a source
    on which those words were one word leaves behind. The inputs' topic is invisible below the top block."""
    import torch
    import transformers

    path = tmp_path_factory.mktemp("topic-blind-bert")
    tiny.save_tiny_model("bert", path)
    model = transformers.AutoModel.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer.convert_tokens_to_ids(sorted(sum(tiny.WORDS.values(), [])))
    with torch.no_grad():
        table = model.embeddings.word_embeddings.weight
        table[ids] = table[ids].mean(dim=0)
    model.save_pretrained(path)
    return path


def read_verdict(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "transfer.json").read_text())


def test_topic_blind_backbone_is_negative_transfer(ray_local, topic_blind_backbone, topic_data, tmp_path, capsys):
    # freeze_depth 1 freezes the bottom block and the embeddings: the pre-trained model cannot see the topic
    path = job_file(tmp_path, topic_blind_backbone, topic_data, finetune={"freeze_depth": 1},
                    safeguards={"compare_scratch": True, "scratch_lrs": [1e-2]})
    assert main(["train", path]) == 0
    printed = capsys.readouterr().out
    verdict = read_verdict(tmp_path)
    assert verdict["verdict"] == "negative", verdict
    assert verdict["scratch"] - verdict["pretrained"] > verdict["margin"] > 0 and verdict["n"] == 60
    assert verdict["scratch_signal"] > verdict["baselines"]["threshold"] > verdict["pretrained_signal"]
    assert "transfer verdict: negative transfer" in printed and "train from scratch" in printed
    assert f"from scratch {verdict['scratch']:.4f}" in printed and "standard error" in printed
    # the twin as it ran: random weights, every block and the embeddings trainable, no adapters, its own LR
    twin = json.loads((tmp_path / "out" / "scratch" / "model" / "shoulders_job.json").read_text())["job"]
    assert twin["model"]["from_scratch"] and twin["peft"]["method"] == "none"
    assert (twin["finetune"]["freeze_depth"], twin["finetune"]["freeze_embeddings"], twin["finetune"]["backbone_lr_ratio"]) == (0, False, 1.0)


@pytest.fixture(scope="module")
def shuffled_labels(tmp_path_factory) -> dict[str, Path]:
    """Topic data whose training labels are shuffled across rows: nothing to learn."""
    data = tiny.write_topic_data(tmp_path_factory.mktemp("shuffled"), seed=3)
    table = pq.read_table(data["train"])
    labels = table.column("label").to_pylist()
    random.Random(0).shuffle(labels)
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", [labels]), data["train"])
    return data


def test_shuffled_labels_are_no_signal(ray_local, tiny_bert, shuffled_labels, tmp_path, capsys):
    path = job_file(tmp_path, tiny_bert, shuffled_labels, finetune={"strategy": "full"})
    assert main(["train", path]) == 0
    printed = capsys.readouterr().out
    verdict = read_verdict(tmp_path)
    assert verdict["verdict"] == "no_signal", verdict
    threshold = verdict["baselines"]["threshold"]
    assert verdict["pretrained_signal"] <= threshold and verdict["scratch_signal"] is None and verdict["n"] == 60
    assert not (tmp_path / "out" / "scratch").exists()  # no twin was trained
    assert "transfer verdict: no signal" in printed and "check the data and labels" in printed.lower()
    assert "negative transfer" not in printed
