"""``shoulders generate`` on a merged and on an adapter export: prompted with the saved chat template."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_chat
from cluster.cli.main import main
from engine.evaluation.answers import score_answers

MESSAGES = [{"role": "user", "content": "what colour is sky"}]


def reference_answer(model, tokenizer, messages, max_new_tokens=8) -> str:
    """Greedy generation written out with plain transformers calls."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A base chat model, an adapter export of a LoRA on it (non-zero adapters) and the merged export of the same."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("exports")
    base = tiny_chat.save_tiny_chat_model(root / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0)
    meta = {"job": {"data": {"layout": "chat"}}, "labels": None, "metrics": None}
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "merged")
    for folder in ("adapter", "merged"):
        tokenizer.save_pretrained(root / folder)
        (root / folder / "shoulders_job.json").write_text(json.dumps(meta))
    return {"base": base, "adapter": root / "adapter", "merged": root / "merged", "model": merged.eval(), "tokenizer": tokenizer}


@pytest.mark.parametrize("kind", ["merged", "adapter"])
def test_generate_answers_like_plain_transformers_with_the_chat_template(exports, kind, capsys):
    want = reference_answer(exports["model"], exports["tokenizer"], MESSAGES)
    assert main(["generate", str(exports[kind]), "--prompt", MESSAGES[0]["content"], "--max-new-tokens", "8", "--jsonl"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == {"prompt": "what colour is sky", "answer": want}


def test_adapter_export_is_not_the_base_model(exports):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(exports["base"]).eval()
    # the adapters change the answer, so the adapter export's equality with the merged one above means they were loaded
    assert reference_answer(base, exports["tokenizer"], MESSAGES) != reference_answer(exports["model"], exports["tokenizer"], MESSAGES)


def test_prompts_file_and_the_job_system_prompt(exports, tmp_path, capsys):
    from engine.evaluation.answers import answers_from_export

    prompts = tmp_path / "prompts.jsonl"
    chat = [{"role": "user", "content": "what colour is apple"}, {"role": "assistant", "content": "red"}, {"role": "user", "content": "and snow"}]
    prompts.write_text(json.dumps({"prompt": "what colour is coal"}) + "\n" + json.dumps({"messages": chat}) + "\n")
    assert main(["generate", str(exports["merged"]), "--prompts-file", str(prompts), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "> what colour is coal" in out and "> and snow" in out
    want = reference_answer(exports["model"], exports["tokenizer"], chat, 4)
    assert f"> and snow\n{want}\n" in out
    meta_path = exports["merged"] / "shoulders_job.json"
    meta_path.write_text(json.dumps({"job": {"data": {"system_prompt": "answer in one word"}}}))
    system = [{"role": "system", "content": "answer in one word"}, *MESSAGES]
    assert answers_from_export(exports["merged"], [MESSAGES], 6) == [reference_answer(exports["model"], exports["tokenizer"], system, 6)]


def test_generate_refuses_a_folder_that_is_no_export(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "is not an exported model" in capsys.readouterr().err


def test_export_keeps_the_job_chat_template(tmp_path):
    from engine.config.schema import build_job
    from engine.tasks import get_task

    base = tiny_chat.save_tiny_chat_model(tmp_path / "base", template=None)
    job = build_job({"model": {"name": str(base), "task": "causal_lm"}, "data": {"train": "t", "layout": "chat", "chat_template": tiny_chat.CHATML}})
    (tokenizer,), _ = get_task(job.model.task).preprocessors(job)
    tokenizer.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "chat_template.jinja").read_text() == tiny_chat.CHATML


def test_scores_exact_match_and_rouge_l():
    scores = score_answers(["Red", "the sky is blue", "green"], ["red", "blue", "white"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    # ROUGE-L F1: 1 for "red", 2*(1/4*1)/(1/4+1)=0.4 for the sky, 0 for green
    assert scores["rougeL"] == pytest.approx((1 + 0.4 + 0) / 3, abs=1e-4)
