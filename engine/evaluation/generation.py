"""Greedy answers from a causal LM, prompted as it was trained: with the chat template (or plain text).

Used at every evaluation (a fixed handful of validation prompts, scored against their references with
exact match and torchmetrics' ROUGE-L) and by ``shoulders generate`` on an exported model folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from engine.preprocessing.chat import Message, prompt_text, template_of, with_system

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_answer(
    model: Any, tokenizer: Any, messages: list[Message], chat_template: str | None, max_new_tokens: int,
    amp_dtype: torch.dtype | None = None, synced_gpus: bool = False,
) -> str:
    """The greedy answer of ``model`` to ``messages`` (ending with a user turn), decoded without special tokens."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))  # seq2seq: the source text, no template
    template = None if encoder_decoder else template_of(tokenizer, chat_template)
    text = messages[-1]["content"] if encoder_decoder else prompt_text(tokenizer, messages, template)
    device = next(model.parameters()).device
    inputs = tokenizer(text, add_special_tokens=template is None, return_tensors="pt").to(device)
    inputs.pop("token_type_ids", None)
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)
    with ctx:
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            synced_gpus=synced_gpus,
        )
    new_tokens = out[0] if encoder_decoder else out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def score_answers(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after lower-casing and collapsing spaces) and ROUGE-L F1 (torchmetrics) of the answers."""
    from torchmetrics.functional.text.rouge import rouge_score

    from engine.evaluation.metrics import normalize_text

    preds, refs = [normalize_text(p) for p in predictions], [normalize_text(r) for r in references]
    exact = sum(p == r for p, r in zip(preds, refs)) / max(len(refs), 1)
    rouge = rouge_score(preds, refs, rouge_keys="rougeL")["rougeL_fmeasure"]
    return {"exact_match": float(exact), "rougeL": float(rouge)}


class AnswerProbe:
    """At each evaluation: greedy answers to a fixed handful of validation prompts, their scores, and a
    record of them in the train state (``TrainState.generations``; the driver writes ``generations.jsonl``).

    Every rank generates the same answers (the same weights), so every rank reports the same metrics.
    """

    def __init__(self, samples: list[dict[str, Any]] | None, job: Any, tokenizer: Any):
        self.samples, self.job, self.tokenizer = samples or [], job, tokenizer

    def __bool__(self) -> bool:
        return bool(self.samples)

    def evaluate(self, model: Any, step: int, records: list[dict[str, Any]], amp_dtype: torch.dtype | None = None) -> dict[str, float]:
        """Generate, score and append the answers at ``step`` to ``records``; returns ``exact_match`` and
        ``rougeL`` (nothing without samples)."""
        if not self.samples:
            return {}
        inner = getattr(model, "module", model)
        backend = self.job.backend
        synced = backend.name == "deepspeed" and backend.zero_stage == 3 and torch.distributed.is_initialized()
        was_training = inner.training
        inner.eval()
        answers = [
            generate_answer(inner, self.tokenizer, s["messages"], self.job.data.chat_template, self.job.eval.max_new_tokens, amp_dtype, synced)
            for s in self.samples
        ]
        inner.train(was_training)
        references = [s["reference"] for s in self.samples]
        records.extend(
            {"step": step, "prompt": s["messages"][-1]["content"], "reference": ref, "answer": answer}
            for s, ref, answer in zip(self.samples, references, answers)
        )
        return score_answers(answers, references)


def write_generations(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Write the evaluation answers as jsonl (temporary name, then renamed); None when there are none."""
    if not records:
        return None
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return path


def load_for_generation(model_dir: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """An exported folder (merged model or PEFT adapter) as (model, tokenizer, its ``shoulders_job.json``)."""
    import transformers

    from engine.evaluation.exported import load_exported
    from engine.models.loading import load_tokenizer
    from engine.tasks import prompt_task

    model_dir = Path(model_dir)
    meta_path = model_dir / "shoulders_job.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    task = prompt_task(((meta.get("job") or {}).get("model") or {}).get("task"))
    if (model_dir / "adapter_config.json").is_file():
        model = load_exported(model_dir, task.name, None)
    else:
        model = getattr(transformers, task.auto_class).from_pretrained(model_dir)
    return model.eval(), load_tokenizer(str(model_dir)), meta


def prompts_from_file(path: str | Path) -> list[list[Message]]:
    """Prompts from a file: ``.jsonl`` rows with ``prompt`` (text) or ``messages`` (a chat ending with a user
    turn); any other file, one prompt per non-empty line."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [[{"role": "user", "content": line}] for line in lines]
    rows = [json.loads(line) for line in lines]
    return [list(r["messages"]) if "messages" in r else [{"role": "user", "content": str(r["prompt"])}] for r in rows]


def generate_from_export(model_dir: str | Path, conversations: list[list[Message]], max_new_tokens: int = 128) -> list[str]:
    """Greedy answers of an exported model, prompted with its saved chat template and the job's system prompt."""
    model, tokenizer, meta = load_for_generation(model_dir)
    system = ((meta.get("job") or {}).get("data") or {}).get("system_prompt")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    return [generate_answer(model, tokenizer, with_system(list(c), system), None, max_new_tokens) for c in conversations]
