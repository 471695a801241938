"""``model.head``: a checkpoint already fine-tuned for the same outputs keeps its head; any other gets a new one."""

from __future__ import annotations

import shutil

import pytest
import torch

import tiny
from cluster.datagen.speech_models import save_ctc_vocab, save_tiny_wav2vec2
from engine.config.schema import build_job
from engine.errors import JobError
from engine.models.prepare import prepare_model

LABELS = ["food", "sport", "tech"]


def job(model_dir, task="sequence_classification", **model):
    return build_job({"model": {"name": str(model_dir), "task": task, **model}, "data": {"train": "unused.parquet"}})


def head_weights(model, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory):
    """A tiny BERT fine-tuned (here: given a distinctive head) for LABELS, saved like a user's checkpoint."""
    base = tiny.save_tiny_model("bert", tmp_path_factory.mktemp("base"))
    model = prepare_model(job(base), LABELS, pad_token_id=0).model
    with torch.no_grad():
        model.classifier.weight.uniform_(-1, 1)
        model.classifier.bias.fill_(0.25)
    out = tmp_path_factory.mktemp("finetuned")
    model.save_pretrained(out)
    shutil.copy(base / "tokenizer.json", out)
    return base, out, head_weights(model, "classifier.")


def test_checkpoint_trained_for_the_same_labels_keeps_its_head(classifier_checkpoint):
    _, finetuned, saved = classifier_checkpoint
    kept = prepare_model(job(finetuned), LABELS, pad_token_id=0)
    assert same(head_weights(kept.model, "classifier."), saved)
    assert {n for n, p in kept.model.named_parameters() if p.requires_grad} >= set(saved)
    # the same checkpoint with head: new gets the seeded fresh head, as a base model does
    fresh = prepare_model(job(finetuned, head="new"), LABELS, pad_token_id=0).model
    assert not same(head_weights(fresh, "classifier."), saved)


def test_other_labels_or_a_base_model_get_a_new_head(classifier_checkpoint):
    base, finetuned, saved = classifier_checkpoint
    reordered = ["tech", "food", "sport"]
    other = head_weights(prepare_model(job(finetuned), reordered, pad_token_id=0).model, "classifier.")
    from_base = head_weights(prepare_model(job(base), reordered, pad_token_id=0).model, "classifier.")
    assert not same(other, saved)
    assert same(other, from_base)  # the same seeded head whatever the checkpoint held there


def test_keep_is_refused_when_the_head_does_not_fit(classifier_checkpoint):
    base, finetuned, _ = classifier_checkpoint
    with pytest.raises(JobError, match="model.head is keep.*no weights of that shape for classifier"):
        prepare_model(job(base, head="keep"), LABELS, pad_token_id=0)
    with pytest.raises(JobError, match=r"model.head is keep.*labels \['food', 'sport', 'tech'\] are not model.labels"):
        prepare_model(job(finetuned, head="keep"), ["tech", "food", "sport"], pad_token_id=0)
    with pytest.raises(JobError, match="model.head: keep needs the checkpoint's weights"):
        job(finetuned, head="keep", from_scratch=True)


def test_finetuned_ctc_checkpoint_keeps_its_output_layer_with_its_own_vocabulary(tmp_path):
    base = save_tiny_wav2vec2(tmp_path / "base")
    model = prepare_model(job(base, "ctc"), None).model
    with torch.no_grad():
        model.lm_head.weight.uniform_(-1, 1)
    finetuned = tmp_path / "finetuned"
    model.save_pretrained(finetuned)
    for name in ("vocab.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        if (base / name).is_file():
            shutil.copy(base / name, finetuned)
    saved = head_weights(model, "lm_head.")
    assert same(head_weights(prepare_model(job(finetuned, "ctc"), None).model, "lm_head."), saved)
    # targets written with another tokenizer (even one of the same size) need a new output layer
    other_vocab = tmp_path / "other-vocab"
    other_vocab.mkdir()
    save_ctc_vocab(other_vocab)
    assert not same(head_weights(prepare_model(job(finetuned, "ctc", tokenizer=str(other_vocab)), None).model, "lm_head."), saved)
