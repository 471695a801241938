"""Instruction tuning end to end through Ray: prompt/completion and chat on a tiny instruct model, answers
generated at every evaluation into the run folder, and the export answering through ``shoulders generate``; T5-style
text seq2seq the same way."""

from __future__ import annotations

import json

import pytest
import yaml

import tiny_chat
from cluster.cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    return tiny_chat.save_tiny_chat_model(root / "model"), tiny_chat.write_instruction_data(root / "data")


def run_job(tmp_path, raw) -> dict:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    return json.loads((tmp_path / "out" / "metrics.json").read_text())


def base_job(model, tmp_path, **data) -> dict:
    """12 optimizer steps (96 rows, batch 16, 2 epochs), an evaluation every 6 with 4 generated answers; packing on."""
    return {
        "name": "tiny-instruct",
        "model": {"name": str(model), "task": "causal_lm"},
        "data": {"max_length": 48, "rows_per_block": 32, "system_prompt": "answer in one word", **data},
        "optim": {"epochs": 2, "batch_size": 16, "warmup_ratio": 0.0, "schedule": "constant"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "eval": {"every_n_steps": 6, "answer_samples": 4, "max_new_tokens": 4},
        "safeguards": {"track_forgetting": False},
        "output": {"dir": str(tmp_path / "out")},
    }


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_answers(tmp_path, history: list[dict], references: list[str]) -> list[dict]:
    """answers.jsonl: the same 4 validation prompts at every evaluation, with their references; the
    scores in the history are those of the recorded answers. Returns the last evaluation's records."""
    from engine.evaluation.answers import score_answers

    records = read_jsonl(tmp_path / "out" / "answers.jsonl")
    assert [r["step"] for r in records] == [h["step"] for h in history for _ in range(4)]
    for h in history:
        at_step = [r for r in records if r["step"] == h["step"]]
        assert [r["reference"] for r in at_step] == references
        scores = score_answers([r["answer"] for r in at_step], references)
        assert scores == {"exact_match": h["val_exact_match"], "rougeL": pytest.approx(h["val_rougeL"], abs=1e-6)}
    return records[-4:]


def generate_jsonl(export, prompts_file, capsys) -> list[str]:
    capsys.readouterr()  # drop the training output
    assert main(["generate", str(export), "--prompts-file", str(prompts_file), "--max-new-tokens", "4", "--jsonl"]) == 0
    return [json.loads(line)["answer"] for line in capsys.readouterr().out.strip().splitlines()]


def test_prompt_completion_full_finetune_writes_answers_and_the_merged_export_answers_alike(instruct, tmp_path, capsys):
    model, data = instruct
    job = base_job(model, tmp_path, train=str(data["pc_train"]), validation=str(data["pc_validation"]), layout="prompt_completion")
    job["finetune"] = {"strategy": "full", "head_lr": 1e-2, "backbone_lr_ratio": 1.0}
    metrics = run_job(tmp_path, job)
    history = metrics["history"]
    assert len(history) == 2 and history[-1]["val_loss"] < 0.7 * history[0]["val_loss"]
    validation = read_jsonl(data["pc_validation"])[:4]
    last = check_answers(tmp_path, history, [row["completion"] for row in validation])
    assert [r["prompt"] for r in last] == [row["prompt"] for row in validation]
    assert any(r["answer"] for r in last)  # it answers (after 12 steps, not necessarily right)
    assert "answers to validation prompts at step 12" in capsys.readouterr().out
    # the merged export, prompted through its saved template and the job's system prompt, answers as training did
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(row["prompt"] + "\n" for row in validation))
    assert generate_jsonl(tmp_path / "out" / "model", prompts, capsys) == [r["answer"] for r in last]


def test_chat_with_lora_from_a_hub_dataset_and_a_disk_folder_trains_the_assistant_turns_and_the_adapter_export_answers_alike(
        instruct, tmp_path, capsys):
    """Also must-show 4 of the datasets work: the training rows come from a hub dataset id found offline in the local
    ``datasets`` cache, the validation rows from a ``save_to_disk`` folder, both streamed from their Arrow files."""
    model, data = instruct
    repo = tiny_chat.save_to_datasets_cache("shoulders-test/colour-chat-train-only", {"train": data["chat_train"]})  # an id of its own: the session shares one cache
    disk = tiny_chat.save_to_disk(tmp_path / "disk", {"validation": data["chat_validation"]})
    job = base_job(model, tmp_path, train={"hf": repo, "split": "train"}, validation={"hf_disk": str(disk), "split": "validation"},
                   layout="chat", messages_column="messages")
    job["data"]["max_length"] = 36  # every chat renders to 37 tokens: each loses its first one, answers kept
    job.update(finetune={"strategy": "lora", "head_lr": 5e-2}, peft={"r": 8, "target_modules": "all-linear"})
    job["eval"]["metric"] = "rougeL"
    job["output"]["export"] = "adapter"
    metrics = run_job(tmp_path, job)
    assert "data.max_length 36: 96 training rows were longer and were cut" in capsys.readouterr().out
    history = metrics["history"]
    assert [h["step"] for h in history] == [6, 12]  # 96 rows read from the hub split: 6 steps of 16 per epoch
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    validation = read_jsonl(data["chat_validation"])[:4]  # the answered prompts come from the disk folder's rows
    last = check_answers(tmp_path, history, [row["messages"][-1]["content"] for row in validation])
    assert [r["prompt"] for r in last] == [row["messages"][-2]["content"] for row in validation]  # each chat's second question
    export = tmp_path / "out" / "model"
    assert (export / "adapter_config.json").is_file()
    prompts = tmp_path / "chats.jsonl"
    prompts.write_text("".join(json.dumps({"messages": row["messages"][:-1]}) + "\n" for row in validation))
    assert generate_jsonl(export, prompts, capsys) == [r["answer"] for r in last]


def test_t5_seq2seq_trains_generates_and_the_adapter_export_answers_alike(instruct, tmp_path, capsys):
    _, data = instruct
    t5 = tiny_chat.save_tiny_t5(tmp_path / "t5")
    job = base_job(t5, tmp_path, train=str(data["pc_train"]), validation=str(data["pc_validation"]), layout="prompt_completion")
    job["model"]["task"] = "seq2seq"
    job.update(finetune={"strategy": "lora", "head_lr": 5e-2}, peft={"r": 8, "target_modules": ["q", "k", "v", "o", "wi", "wo"]})
    job["output"]["export"] = "adapter"
    metrics = run_job(tmp_path, job)
    history = metrics["history"]
    assert len(history) == 2 and history[-1]["val_loss"] < history[0]["val_loss"]
    validation = read_jsonl(data["pc_validation"])[:4]
    last = check_answers(tmp_path, history, [row["completion"] for row in validation])
    assert [r["prompt"] for r in last] == [row["prompt"] for row in validation]
    assert (tmp_path / "out" / "model" / "adapter_config.json").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(row["prompt"] + "\n" for row in validation))
    assert generate_jsonl(tmp_path / "out" / "model", prompts, capsys) == [r["answer"] for r in last]
