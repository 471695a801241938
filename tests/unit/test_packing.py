"""Sequence packing: the same loss as the padded batch, no cross-example attention, fewer rows."""

from __future__ import annotations

import numpy as np
import torch

from engine.preprocessing.packing import IGNORE_INDEX, first_fit_decreasing, group_by_length, pack_batch


def padded_batch(lengths: list[int], width: int, vocab: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, vocab, n)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, IGNORE_INDEX)}


def test_first_fit_decreasing_respects_capacity_and_keeps_every_example():
    lengths = [9, 3, 7, 1, 5, 2, 8]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 35 tokens need at least 4 rows of 10


def test_pack_batch_layout():
    batch = padded_batch([5, 3, 2, 6], width=8)
    batch["sample_id"] = np.array([10, 11, 12, 13])
    packed = pack_batch(batch, max_length=8)
    assert packed["input_ids"].shape == (2, 8)
    assert packed["sample_id"].tolist() == [10, 11, 12, 13] and "attention_mask" not in packed
    pos = packed["position_ids"]
    assert sorted(int(x) for x in (pos == 0).sum(axis=1)) == [2, 2]  # two examples start in each row
    assert (packed["labels"][pos == 0] == IGNORE_INDEX).all()  # no example's first token is a target
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == (5 - 1) + (3 - 1) + (2 - 1) + (6 - 1)


def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def test_packed_loss_equals_padded_loss():
    model = tiny_lm()
    batch = padded_batch([11, 4, 7, 16, 3, 9], width=16)
    packed = pack_batch(batch, max_length=24)
    assert packed["input_ids"].shape[0] < 6
    with torch.no_grad():
        padded_loss = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).loss
        packed_loss = model(**{k: torch.from_numpy(v) for k, v in packed.items()}).loss
    assert torch.allclose(packed_loss, padded_loss, atol=1e-5), (packed_loss, padded_loss)


def test_packing_blocks_cross_example_attention():
    """Changing one example's tokens must not change another example's logits in the same packed row."""
    model = tiny_lm()
    batch = padded_batch([6, 6], width=6)
    packed = pack_batch(batch, max_length=12)
    assert packed["input_ids"].shape == (1, 12)
    ids = torch.from_numpy(packed["input_ids"])
    pos = torch.from_numpy(packed["position_ids"])
    changed = ids.clone()
    changed[0, :6] = (changed[0, :6] + 1) % 50
    with torch.no_grad():
        a = model(input_ids=ids, position_ids=pos).logits
        b = model(input_ids=changed, position_ids=pos).logits
    assert torch.allclose(a[0, 6:], b[0, 6:], atol=1e-5)
    assert not torch.allclose(a[0, :6], b[0, :6], atol=1e-3)


def test_group_by_length_makes_homogeneous_micro_batches():
    lengths = [2, 15, 3, 14, 4, 13, 5, 12]
    groups = group_by_length(padded_batch(lengths, width=16), micro_batch=2, seed=0)
    assert len(groups) == 4
    spreads = [int(np.ptp(g["attention_mask"].sum(axis=1))) for g in groups]
    assert max(spreads) <= 1
    assert sorted(int(n) for g in groups for n in g["attention_mask"].sum(axis=1)) == sorted(lengths)


def test_group_rows_by_length_is_deterministic_and_applies_only_to_classification():
    from engine.config.schema import build_job
    from engine.preprocessing.packing import group_rows_by_length, length_grouping_window

    batch = padded_batch([2, 15, 3, 14, 4, 13, 5, 12], width=16)
    a = group_rows_by_length(batch, micro_batch=2, seed=7)
    b = group_rows_by_length(batch, micro_batch=2, seed=7)
    assert all(np.array_equal(a[k], b[k]) for k in batch)  # same data, same order: resume stays exact
    lengths = a["attention_mask"].sum(axis=1)
    assert all(abs(int(lengths[i]) - int(lengths[i + 1])) <= 1 for i in range(0, 8, 2))
    base = {"model": {"name": "m"}, "data": {"train": "t"}, "optim": {"batch_size": 4}}
    assert length_grouping_window(build_job(base)) is None  # off by default
    on = {**base, "perf": {"group_by_length": True, "group_window": 3}}
    assert length_grouping_window(build_job(on)) == 12
    lm = {**on, "model": {"name": "m", "task": "causal_lm"}}
    assert length_grouping_window(build_job(lm)) is None  # causal LM packs instead
