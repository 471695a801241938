"""Prompt/completion and chat data refused before any worker starts, naming the key and the row."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import tiny_chat
from cluster.preflight.data import check_data
from engine.config.schema import build_job
from engine.errors import JobError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {
        "chat": tiny_chat.save_tiny_chat_model(tmp_path_factory.mktemp("chat")),
        "base": tiny_chat.save_tiny_chat_model(tmp_path_factory.mktemp("base"), template=None),
    }


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def job(model, train, layout, **data):
    return build_job({"model": {"name": str(model), "task": "causal_lm"}, "data": {"train": train, "layout": layout, **data}})


GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_good_chat_and_prompt_completion_pass(models, tmp_path):
    info = check_data(job(models["chat"], write_jsonl(tmp_path / "c.jsonl", [GOOD_CHAT] * 3), "chat"))
    assert info.splits["train"].num_rows == 3
    pc = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    assert check_data(job(models["base"], pc, "prompt_completion")).splits["train"].num_rows == 2  # no template needed


def test_chat_without_any_template_is_refused_unless_the_job_gives_one(models, tmp_path):
    train = write_jsonl(tmp_path / "c.jsonl", [GOOD_CHAT])
    with pytest.raises(JobError, match="data.layout is chat but model.name .* has no chat template.*data.chat_template"):
        check_data(job(models["base"], train, "chat"))
    template = tmp_path / "chatml.jinja"
    template.write_text(tiny_chat.CHATML)
    given = job(models["base"], train, "chat", chat_template=str(template))
    assert given.data.chat_template == tiny_chat.CHATML  # a .jinja path is read at validation
    check_data(given)


def test_unknown_role_empty_answer_and_missing_answer_name_the_row(models, tmp_path):
    bad_role = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}
    train = write_jsonl(tmp_path / "r.jsonl", [GOOD_CHAT, GOOD_CHAT, bad_role])
    with pytest.raises(JobError, match=r"data.train row 2: column 'messages' \(data.messages_column\) message 1 has role 'bot'"):
        check_data(job(models["chat"], train, "chat"))
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(JobError, match="data.train row 1: .*has no assistant turn"):
        check_data(job(models["chat"], write_jsonl(tmp_path / "n.jsonl", [GOOD_CHAT, no_answer]), "chat"))
    empty_turn = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
    with pytest.raises(JobError, match="data.train row 0: .*message 1 is an assistant turn with empty content"):
        check_data(job(models["chat"], write_jsonl(tmp_path / "e.jsonl", [empty_turn]), "chat"))
    pc = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}])
    with pytest.raises(JobError, match=r"data.train row 1: column 'completion' \(data.completion_column\) is empty"):
        check_data(job(models["chat"], pc, "prompt_completion"))


def test_missing_columns_name_the_layout_keys(models, tmp_path):
    train = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(JobError, match=r"column 'prompt' \(data.prompt_column\) is not in"):
        check_data(job(models["chat"], train, "prompt_completion"))
    check_data(job(models["chat"], train, "prompt_completion", prompt_column="instruction", completion_column="output"))


def test_layout_needs_causal_lm_and_a_missing_template_file_is_named():
    with pytest.raises(JobError, match="data.layout is 'chat' but model.task is 'sequence_classification'"):
        build_job({"model": {"name": "m"}, "data": {"train": "t", "layout": "chat"}})
    with pytest.raises(JobError, match="data.chat_template: file 'nope.jinja' does not exist"):
        build_job({"model": {"name": "m", "task": "causal_lm"}, "data": {"train": "t", "layout": "chat", "chat_template": "nope.jinja"}})


def test_text_preflight_imports_no_torch():
    code = "import sys, cluster.preflight.text, cluster.preflight.job; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_retention_set_of_instruction_data_reads_prompts_or_chats(models, tmp_path):
    from engine.safeguards.guards import read_retention_texts

    chat = write_jsonl(tmp_path / "c.jsonl", [GOOD_CHAT])
    pc = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what colour is sky", "completion": "blue"}])
    splits = lambda path: {"train": ([path], "json")}  # noqa: E731
    assert read_retention_texts(job(models["chat"], chat, "chat"), splits(chat)) == ["hi\nhello"]
    assert read_retention_texts(job(models["chat"], pc, "prompt_completion"), splits(pc)) == ["what colour is sky"]
    t5 = build_job({"model": {"name": "m", "task": "seq2seq"}, "data": {"train": pc, "layout": "prompt_completion"}})
    assert read_retention_texts(t5, splits(pc)) is None  # no retention measure for encoder-decoders
