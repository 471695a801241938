"""Exact trainable-parameter sets per freeze depth, with and without LoRA, on tiny BERT and Llama."""

from __future__ import annotations

import pytest

import tiny
from engine.config.schema import build_job
from engine.models.prepare import prepare_model

LABELS = ["food", "sport", "tech"]
DEPTH = 4

BERT_BLOCK = [
    "attention.self.query.weight", "attention.self.query.bias", "attention.self.key.weight", "attention.self.key.bias",
    "attention.self.value.weight", "attention.self.value.bias", "attention.output.dense.weight", "attention.output.dense.bias",
    "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias", "intermediate.dense.weight", "intermediate.dense.bias",
    "output.dense.weight", "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias",
]
BERT_EMBEDDINGS = [
    "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias",
]
BERT_TOP = ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
BERT_HEAD = ["classifier.weight", "classifier.bias"]

LLAMA_BLOCK = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
]
LLAMA_EMBEDDINGS = ["model.embed_tokens.weight"]
LLAMA_TOP = ["model.norm.weight"]
LLAMA_HEAD = ["score.weight"]

ARCH = {
    "bert": dict(prefix="bert.encoder.layer", block=BERT_BLOCK, embeddings=BERT_EMBEDDINGS, top=BERT_TOP, head=BERT_HEAD, lora=("attention.self.query", "attention.self.value")),
    "llama": dict(prefix="model.layers", block=LLAMA_BLOCK, embeddings=LLAMA_EMBEDDINGS, top=LLAMA_TOP, head=LLAMA_HEAD, lora=("self_attn.q_proj", "self_attn.v_proj")),
}


@pytest.fixture(scope="module", params=["bert", "llama"])
def arch_model(request, tmp_path_factory):
    return request.param, tiny.save_tiny_model(request.param, tmp_path_factory.mktemp(request.param), layers=DEPTH)


def trainable(model_dir, **sections) -> set[str]:
    job = build_job({"model": {"name": str(model_dir), "labels": LABELS}, "data": {"train": "unused.parquet"}, **sections})
    prepared = prepare_model(job, LABELS, pad_token_id=0)
    return {name for name, p in prepared.model.named_parameters() if p.requires_grad}


def expected_full(arch: str, n_frozen: int) -> set[str]:
    a = ARCH[arch]
    names = {f"{a['prefix']}.{i}.{p}" for i in range(n_frozen, DEPTH) for p in a["block"]} | set(a["head"])
    if n_frozen == 0:
        names |= set(a["embeddings"])
    if n_frozen < DEPTH:
        names |= set(a["top"])
    return names


def expected_lora(arch: str, n_frozen: int) -> set[str]:
    a = ARCH[arch]
    adapters = {
        f"base_model.model.{a['prefix']}.{i}.{module}.lora_{ab}.default.weight"
        for i in range(n_frozen, DEPTH) for module in a["lora"] for ab in "AB"
    }
    head = {f"base_model.model.{h.rsplit('.', 1)[0]}.modules_to_save.default.{h.rsplit('.', 1)[1]}" for h in a["head"]}
    return adapters | head


@pytest.mark.parametrize("depth", [0, 2, "all"])
def test_full_finetune_trainable_set_per_freeze_depth(arch_model, depth):
    arch, model_dir = arch_model
    n_frozen = DEPTH if depth == "all" else depth
    assert trainable(model_dir, finetune={"freeze_depth": depth}) == expected_full(arch, n_frozen)


@pytest.mark.parametrize("depth", [0, 2])
def test_lora_adapts_only_unfrozen_blocks_and_trains_the_head(arch_model, depth):
    arch, model_dir = arch_model
    assert trainable(model_dir, finetune={"freeze_depth": depth}, peft={"method": "lora"}) == expected_lora(arch, depth)


def test_lora_with_everything_frozen_is_feature_extraction(arch_model):
    arch, model_dir = arch_model
    assert trainable(model_dir, finetune={"freeze_depth": "all"}, peft={"method": "lora"}) == set(ARCH[arch]["head"])


def test_presets_fill_fields_and_user_values_win(arch_model):
    arch, model_dir = arch_model
    assert trainable(model_dir, finetune={"strategy": "feature_extraction"}) == set(ARCH[arch]["head"])
    assert trainable(model_dir, finetune={"strategy": "light"}) == expected_full(arch, DEPTH - 2)
    assert trainable(model_dir, finetune={"strategy": "light", "freeze_depth": 1}) == expected_full(arch, 1)
    assert trainable(model_dir, finetune={"strategy": "lora"}) == expected_lora(arch, 0)


def test_freeze_depth_beyond_the_model_is_refused(arch_model):
    _, model_dir = arch_model
    with pytest.raises(ValueError, match="only 4 blocks"):
        trainable(model_dir, finetune={"freeze_depth": DEPTH + 1})


def test_new_head_is_reinitialised_the_same_on_every_worker(arch_model):
    _, model_dir = arch_model
    job = build_job({"model": {"name": str(model_dir), "labels": LABELS}, "data": {"train": "x.parquet"}})
    a = prepare_model(job, LABELS, pad_token_id=0).model
    b = prepare_model(job, LABELS, pad_token_id=0).model
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert (pa == pb).all(), name
