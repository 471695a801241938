"""The LoRA fast path (fused LoRA over frozen weights, FP8 emulation, packing) with answer-only labels:
the same loss and adapter gradients as plain PEFT on the padded batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tiny_chat
from engine.preprocessing.chat import encode_conversations
from engine.config.sections import PerfSpec
from engine.preprocessing.packing import pack_batch
from engine.perf.speed import apply_perf

CHATS = [
    [{"role": "user", "content": "what colour is apple"}, {"role": "assistant", "content": "red"},
     {"role": "user", "content": "and sky"}, {"role": "assistant", "content": "blue"}],
    [{"role": "system", "content": "answer in one word"}, {"role": "user", "content": "what colour is coal"}, {"role": "assistant", "content": "black"}],
    [{"role": "user", "content": "what colour is grass"}, {"role": "assistant", "content": "green"}],
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.models.loading import load_tokenizer

    path = tiny_chat.save_tiny_chat_model(tmp_path_factory.mktemp("chat"))
    cells = np.empty(len(CHATS), dtype=object)
    for i, chat in enumerate(CHATS):
        cells[i] = chat
    batch = encode_conversations({"messages": cells}, tokenizer=load_tokenizer(str(path)), layout="chat", columns={"messages": "messages"}, max_length=48)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", use_cache=False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False))
    return model, batch


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_on_packed_answer_only_batch_matches_plain_peft_padded(setup):
    model, batch = setup
    assert (batch["labels"] == -100).sum() > (batch["labels"] != -100).sum()  # mostly prompt: the mask matters
    reference = copy.deepcopy(model)
    fast = copy.deepcopy(model)
    plan = apply_perf(fast, PerfSpec(), "causal_lm", torch.device("cpu"), None)
    assert plan.fused_lora == 14
    packed = pack_batch(batch, max_length=96)
    assert packed["input_ids"].shape[0] < len(CHATS)
    want_loss, want_grads = loss_and_grads(reference, batch)
    loss, grads = loss_and_grads(fast, packed)
    assert torch.allclose(loss, want_loss, atol=1e-5), (loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], want_grads[name], atol=1e-5, rtol=1e-4), name


def test_fp8_frozen_weights_with_answer_only_labels_stay_close(setup):
    model, batch = setup
    reference, fast = copy.deepcopy(model), copy.deepcopy(model)
    plan = apply_perf(fast, PerfSpec(fp8_frozen="on"), "causal_lm", torch.device("cpu"), torch.bfloat16)
    assert plan.fp8 and plan.fp8_layers == 14
    want, _ = loss_and_grads(reference, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(fast, pack_batch(batch, max_length=96))
    assert torch.isfinite(loss) and abs(loss.item() - want.item()) < 0.05 * want.item()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
