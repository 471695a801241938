"""Prompt/completion and chat rows: the exact label mask, packing that keeps it, truncation that keeps the answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_chat
from engine.preprocessing.chat import IGNORE_INDEX, answer_spans, encode_conversations, encode_row, keep_answer
from engine.preprocessing.packing import pack_batch

CHAT = [
    {"role": "user", "content": "what colour is apple"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "and sky"},
    {"role": "assistant", "content": "blue"},
]
# The same chat written out by hand in ChatML; True marks the segments that are answers.
SEGMENTS = [
    ("<|im_start|>user\nwhat colour is apple<|im_end|>\n<|im_start|>assistant\n", False),
    ("red<|im_end|>\n", True),
    ("<|im_start|>user\nand sky<|im_end|>\n<|im_start|>assistant\n", False),
    ("blue<|im_end|>\n", True),
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = tiny_chat.save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))
    from engine.models.loading import load_tokenizer

    return path, load_tokenizer(str(path))


def hand_made(tokenizer) -> tuple[list[int], list[int]]:
    """Ids and labels built segment by segment, independently of the engine's span search."""
    ids, labels = [], []
    for text, is_answer in SEGMENTS:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    return ids, labels


def chat_batch(tokenizer, chats: list[list[dict]], max_length: int = 64) -> dict[str, np.ndarray]:
    cells = np.empty(len(chats), dtype=object)
    cells[:] = [np.array(c, dtype=object) for c in chats]  # as Ray Data hands a list<struct> column over
    return encode_conversations({"messages": cells}, tokenizer=tokenizer, layout="chat", columns={"messages": "messages"}, max_length=max_length)


def test_two_turn_chat_label_mask_is_exactly_the_assistant_turns(chat_model):
    _, tokenizer = chat_model
    ids, labels, cut = encode_row(tokenizer, CHAT, tokenizer.chat_template, 64)
    want_ids, want_labels = hand_made(tokenizer)
    assert not cut
    assert ids == want_ids
    assert labels == want_labels
    counted = [t for t in labels if t != IGNORE_INDEX]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(counted) == "red<|im_end|>\nblue<|im_end|>\n"
    assert counted.count(im_end) == 2  # each answer's end-of-turn is learnt (the model learns to stop)
    ignored = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert "user" in ignored and "what colour is apple" in ignored and "and sky" in ignored and "red" not in ignored
    # the padded batch row carries the same labels, -100 in the padding
    batch = chat_batch(tokenizer, [CHAT])
    n = len(want_ids)
    assert batch["labels"][0, :n].tolist() == want_labels and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum() == n


def test_packed_rows_keep_the_masks_and_packed_loss_equals_padded_loss(chat_model):
    from transformers import AutoModelForCausalLM

    path, tokenizer = chat_model
    coal = [{"role": "user", "content": "what colour is coal"}, {"role": "assistant", "content": "black"}]
    chats = [CHAT, CHAT[:2], [{"role": "system", "content": "answer in one word"}, *CHAT], coal]
    batch = chat_batch(tokenizer, chats)
    packed = pack_batch(batch, max_length=64 + 40)
    assert packed["input_ids"].shape[0] < len(chats)  # packing did pack
    # every example's counted tokens survive packing unchanged (its first token is a prompt token anyway)
    lengths = batch["attention_mask"].sum(axis=1)
    padded_targets = sorted(tuple(batch["labels"][i, :n][batch["labels"][i, :n] != IGNORE_INDEX]) for i, n in enumerate(lengths))
    packed_targets = []
    for row in range(packed["input_ids"].shape[0]):
        starts = list(np.flatnonzero(packed["position_ids"][row] == 0)) + [packed["input_ids"].shape[1]]
        for a, b in zip(starts, starts[1:]):
            segment = packed["labels"][row, a:b]
            if (segment != IGNORE_INDEX).any():
                packed_targets.append(tuple(segment[segment != IGNORE_INDEX]))
    assert sorted(packed_targets) == padded_targets
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", use_cache=False).eval()  # as training runs it (engine.perf.speed)
    with torch.no_grad():
        padded_loss = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).loss
        packed_loss = model(**{k: torch.from_numpy(v) for k, v in packed.items()}).loss
    assert torch.allclose(packed_loss, padded_loss, atol=1e-5), (packed_loss, padded_loss)
    # with every token a target the two losses differ: the answers-only mask is what the model sees
    full = dict(batch, labels=np.where(batch["attention_mask"] == 1, batch["input_ids"], IGNORE_INDEX))
    with torch.no_grad():
        assert not torch.allclose(model(**{k: torch.from_numpy(v) for k, v in full.items()}).loss, padded_loss, atol=1e-3)


def test_truncation_keeps_the_last_answer_and_cuts_the_start(chat_model):
    _, tokenizer = chat_model
    ids, labels, _ = encode_row(tokenizer, CHAT, tokenizer.chat_template, 64)
    last_answer = tokenizer("blue<|im_end|>\n", add_special_tokens=False)["input_ids"]
    cut_ids, cut_labels, cut = encode_row(tokenizer, CHAT, tokenizer.chat_template, len(last_answer) + 3)
    assert cut and cut_ids == ids[-len(last_answer) - 3 :]
    assert [t for t in cut_labels if t != IGNORE_INDEX] == last_answer
    # an answer longer than max_length keeps its beginning
    ids2, labels2, cut2 = keep_answer(list(range(10)), [IGNORE_INDEX] * 4 + list(range(4, 10)), 3)
    assert cut2 and ids2 == [4, 5, 6] and labels2 == [4, 5, 6]
    marked = encode_conversations({"messages": batch_cells([CHAT, CHAT[:2]])}, tokenizer=tokenizer, layout="chat",
                                  columns={"messages": "messages"}, max_length=len(ids) - 1, mark_truncated=True)
    assert marked["truncated"].tolist() == [1, 0]


def batch_cells(chats):
    cells = np.empty(len(chats), dtype=object)
    cells[:] = chats
    return cells


def test_prompt_completion_with_template_system_prompt_and_without_template(chat_model, tmp_path):
    from engine.models.loading import load_tokenizer

    _, tokenizer = chat_model
    batch = {"q": np.array(["what colour is snow"], dtype=object), "a": np.array(["white"], dtype=object)}
    out = encode_conversations(batch, tokenizer=tokenizer, layout="prompt_completion", columns={"prompt": "q", "completion": "a"},
                               max_length=64, system_prompt="answer in one word")
    n = int(out["attention_mask"][0].sum())
    text = tokenizer.decode(out["input_ids"][0, :n])
    assert text.startswith("<|im_start|>system\nanswer in one word<|im_end|>\n<|im_start|>user\nwhat colour is snow")
    assert tokenizer.decode([t for t in out["labels"][0] if t != IGNORE_INDEX]) == "white<|im_end|>\n"
    # a base model without a chat template: prompt + completion + EOS, the loss on completion + EOS
    plain = load_tokenizer(str(tiny_chat.save_tiny_chat_model(tmp_path / "base", template=None)))
    assert not plain.chat_template
    out = encode_conversations(batch, tokenizer=plain, layout="prompt_completion", columns={"prompt": "q", "completion": "a"}, max_length=64)
    n = int(out["attention_mask"][0].sum())
    assert plain.decode(out["input_ids"][0, :n]) == "what colour is snowwhite<|im_end|>"
    assert plain.decode([t for t in out["labels"][0] if t != IGNORE_INDEX]) == "white<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_model):
    _, tokenizer = chat_model
    # renders only the last assistant turn in full: an earlier turn's text changes once more turns follow
    odd = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[earlier]{% else %}"
           "<{{ m['role'] }}>{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(ValueError, match="renders a turn differently"):
        answer_spans(tokenizer, CHAT, odd)
    with pytest.raises(ValueError, match="row 0 .*no assistant turn"):
        chat_batch(tokenizer, [CHAT[:1]])
