"""Text seq2seq (T5): labels are the target tokens with EOS, trimmed per batch; LoRA trains; generation answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_chat
from engine.preprocessing.chat import IGNORE_INDEX
from engine.config.schema import build_job
from engine.errors import JobError
from engine.preprocessing.text import trim_batch
from engine.preprocessing.seq2seq import TARGET_MASK, encode_pairs


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    from engine.models.loading import load_tokenizer

    path = tiny_chat.save_tiny_t5(tmp_path_factory.mktemp("t5"))
    return path, load_tokenizer(str(path))


def pairs(sources: list[str], targets: list[str]) -> dict[str, np.ndarray]:
    return {"src": np.array(sources, dtype=object), "tgt": np.array(targets, dtype=object)}


def test_labels_are_the_target_with_eos_and_trim_to_their_own_length(t5):
    _, tokenizer = t5
    batch = pairs(["what colour is apple and the sky and the grass", "what colour is coal"], ["red", "black"])
    out = encode_pairs(batch, tokenizer=tokenizer, columns={"prompt": "src", "completion": "tgt"}, max_length=24, mark_truncated=True)
    red = tokenizer("red")["input_ids"]
    assert red[-1] == tokenizer.eos_token_id
    assert out["labels"][0, : len(red)].tolist() == red and (out["labels"][0, len(red):] == IGNORE_INDEX).all()
    assert out["truncated"].tolist() == [0, 0]
    trimmed = trim_batch(out)
    assert TARGET_MASK not in trimmed
    longest_target = max(len(red), len(tokenizer("black")["input_ids"]))
    longest_source = int(out["attention_mask"].sum(axis=1).max())
    assert trimmed["labels"].shape == (2, longest_target) and trimmed["input_ids"].shape == (2, longest_source)
    assert longest_source > longest_target  # each side trimmed on its own
    cut = encode_pairs(batch, tokenizer=tokenizer, columns={"prompt": "src", "completion": "tgt"}, max_length=6, mark_truncated=True)
    assert cut["truncated"].tolist() == [1, 0]


def test_t5_job_with_lora_trains_and_generates(t5):
    from engine.evaluation.answers import generate_answer
    from engine.models.prepare import prepare_model

    path, tokenizer = t5
    job = build_job({"model": {"name": str(path), "task": "seq2seq"}, "data": {"train": "t", "layout": "prompt_completion"},
                     "finetune": {"strategy": "lora"}, "peft": {"target_modules": ["q", "v"]}})
    prepared = prepare_model(job, None, tokenizer.pad_token_id)
    assert prepared.stack.path.endswith("encoder.block")
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = trim_batch(encode_pairs(pairs(["what colour is snow"] * 4, ["white"] * 4), tokenizer=tokenizer,
                                    columns={"prompt": "src", "completion": "tgt"}, max_length=16))
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    loss = prepared.model(**tensors).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for n, p in prepared.model.named_parameters() if "lora_B" in n)
    answer = generate_answer(prepared.model.eval(), tokenizer, [{"role": "user", "content": "what colour is snow"}], None, 4)
    with torch.no_grad():
        ids = tokenizer("what colour is snow", return_tensors="pt")["input_ids"]
        want = prepared.model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert answer == tokenizer.decode(want[0], skip_special_tokens=True).strip()


def test_seq2seq_needs_prompt_completion_and_chat_needs_causal_lm():
    with pytest.raises(JobError, match="model.task seq2seq reads a source and a target column: set data.layout: prompt_completion"):
        build_job({"model": {"name": "m", "task": "seq2seq"}, "data": {"train": "t"}})
    with pytest.raises(JobError, match="chat data trains model.task causal_lm"):
        build_job({"model": {"name": "m", "task": "seq2seq"}, "data": {"train": "t", "layout": "chat"}})
    job = build_job({"model": {"name": "m", "task": "seq2seq"}, "data": {"train": "t", "layout": "prompt_completion"}})
    assert job.eval_metric == "loss" and job.eval_mode == "min"
