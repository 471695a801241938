"""The LLM jobs in jobs/ pass every check before training against a tiny local instruct model, and their
shipped data renders with answer-only labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tiny_chat
from cluster.preflight.data import check_data
from cluster.preflight.job import check_model
from engine.preprocessing.chat import IGNORE_INDEX, encode_conversations, layout_columns
from engine.config.schema import load_job

ROOT = Path(__file__).parents[2]


def object_column(values: list) -> np.ndarray:
    """A 1-D object array of cells (lists stay cells), as Ray Data hands a column to map_batches."""
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


@pytest.fixture(scope="module")
def tiny_instruct(tmp_path_factory) -> Path:
    return tiny_chat.save_tiny_chat_model(tmp_path_factory.mktemp("tiny-instruct"))


@pytest.mark.parametrize("name, layout, rows", [("llm_sft_lora.yaml", "prompt_completion", 64), ("llm_chat_lora.yaml", "chat", 64)])
def test_llm_job_passes_preflight_on_a_tiny_local_model(tiny_instruct, name, layout, rows):
    raw = load_job(ROOT / "jobs" / name)
    assert raw.model.name == "Qwen/Qwen2.5-0.5B-Instruct" and raw.data.layout == layout and raw.peft.method == "lora"
    job = load_job(ROOT / "jobs" / name, [
        f"model.name={tiny_instruct}", f"data.train={ROOT / raw.data.train}", f"data.validation={ROOT / raw.data.validation}",
    ])
    check_model(job)
    info = check_data(job)
    assert info.splits["train"].num_rows == rows
    import pyarrow.json as pj

    from engine.models.loading import load_tokenizer

    table = pj.read_json(job.data.train).slice(0, 8).to_pydict()
    batch = {k: object_column(v) for k, v in table.items()}
    out = encode_conversations(batch, tokenizer=load_tokenizer(str(tiny_instruct)), layout=layout, columns=layout_columns(job.data),
                               max_length=job.data.max_length, system_prompt=job.data.system_prompt)
    targets = (out["labels"] != IGNORE_INDEX).sum(axis=1)
    prompts = ((out["labels"] == IGNORE_INDEX) & (out["attention_mask"] == 1)).sum(axis=1)
    assert (targets > 0).all() and (prompts > targets).all()  # every row learns a short answer, not its prompt


def test_t5_job_passes_preflight_on_a_tiny_local_t5(tmp_path):
    from engine.preprocessing.seq2seq import encode_pairs

    raw = load_job(ROOT / "jobs" / "t5_seq2seq.yaml")
    assert raw.model.name == "google/flan-t5-small" and raw.model.task == "seq2seq" and raw.peft.method == "lora"
    t5 = tiny_chat.save_tiny_t5(tmp_path / "t5")
    job = load_job(ROOT / "jobs" / "t5_seq2seq.yaml", [
        f"model.name={t5}", f"data.train={ROOT / raw.data.train}", f"data.validation={ROOT / raw.data.validation}",
    ])
    check_model(job)
    assert check_data(job).splits["validation"].num_rows == 16
    import pyarrow.json as pj

    from engine.models.loading import load_tokenizer

    table = pj.read_json(job.data.train).slice(0, 8).to_pydict()
    out = encode_pairs({k: object_column(v) for k, v in table.items()}, tokenizer=load_tokenizer(str(t5)),
                       columns=layout_columns(job.data), max_length=job.data.max_length)
    assert ((out["labels"] != IGNORE_INDEX).sum(axis=1) > 1).all()  # every target has its tokens and EOS
