"""The evaluation answers of a prompt/completion or chat run, shown at the end of ``shoulders train``, and
``shoulders generate``'s output. No torch here: ``engine.evaluation.answers`` generates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ANSWERS_FILE = "answers.jsonl"
"""Greedy answers to the fixed validation prompts at every evaluation (``step``, ``prompt``, ``reference``, ``answer``)."""


def read_answers(output_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's ``answers.jsonl`` (empty when the run wrote none)."""
    path = Path(output_dir) / ANSWERS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_eval_answers(output_dir: Path, console: Console | None = None) -> None:
    """The last evaluation's answers next to their references (nothing when the run wrote none)."""
    records = read_answers(output_dir)
    if not records:
        return
    last = max(r["step"] for r in records)
    table = Table(title=f"answers to validation prompts at step {last} (all steps: {Path(output_dir) / ANSWERS_FILE})")
    for column in ("prompt", "reference", "answer"):
        table.add_column(column, overflow="fold")
    for record in records:
        if record["step"] == last:
            table.add_row(record["prompt"], record["reference"], record["answer"])
    (console or Console()).print(table)


def print_answers(prompts: list[list[dict[str, str]]], answers: list[str], as_jsonl: bool = False) -> None:
    """``shoulders generate``'s output: each prompt's last user turn and the answer (or JSON lines)."""
    for messages, answer in zip(prompts, answers):
        prompt = messages[-1]["content"]
        print(json.dumps({"prompt": prompt, "answer": answer}) if as_jsonl else f"> {prompt}\n{answer}\n")
