"""Real runs on a local Ray that must finish or fail fast, while another Ray instance runs on the host
(a model named by hub id, served offline from a local Hugging Face cache, trains in ``test_console_run.py``):

- a bad row deep in a multi-file dataset (past the rows the preflight samples) stops the run within bounded
  time, the last words naming the file and the row, and nothing is exported.

Every in-process Ray test here runs beside a ``ray start`` instance (the session's ``other_ray``).
``shoulders tune`` as a user runs it (a new process, embedded Ray) beside that instance, its second trial
starting once the first one's reservation is freed and no log saying "multiple active Ray instances", is
checked by the killed-and-resumed search in ``test_tune.py``. ``shoulders train`` starts its Ray the same
way (``cluster.run.trainer.start_embedded_ray``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cluster.cli.main import main
from cluster.preflight.data import SAMPLE_ROWS

pytestmark = [pytest.mark.slow, pytest.mark.ray]
LABELS = ["food", "sport", "tech"]


def small_job(model: str, splits: dict, out: Path, **sections) -> dict:
    raw = {
        "name": "tiny",
        "model": {"name": model, "labels": LABELS},
        "data": {**{k: str(v) for k, v in splits.items()}, "max_length": 16, "rows_per_block": 64},
        "finetune": {"strategy": "full", "head_lr": 1e-2},
        "optim": {"epochs": 1, "batch_size": 16, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def write(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_bad_row_deep_in_a_multi_file_dataset_stops_the_run(ray_local, tiny_bert, tmp_path, capsys):
    folder = tmp_path / "train"
    folder.mkdir()
    rows_per_file, bad_file, bad_row = 400, 2, SAMPLE_ROWS + 57  # past what the preflight reads
    for index in range(4):
        labels = [LABELS[i % 3] for i in range(rows_per_file)]
        texts = [f"apple bread {i}" if labels[i] == "food" else f"ball team {i}" for i in range(rows_per_file)]
        if index == bad_file:
            texts[bad_row - 1] = None
        pq.write_table(pa.table({"text": texts, "label": labels}), folder / f"part-{index}.parquet")
    valid = tmp_path / "validation.parquet"
    pq.write_table(pa.table({"text": ["apple bread", "ball team", "disk cpu"], "label": LABELS}), valid)
    model = tiny_bert
    out = tmp_path / "out"
    # batches of 64: the run streams ~800 good rows before the bad one; few steps keep the test short
    job = write(tmp_path / "job.yaml", small_job(str(model), {"train": folder, "validation": valid}, out, optim={"batch_size": 64}))
    started = time.perf_counter()
    code = main(["train", job])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and elapsed < 180, (code, elapsed)
    last = err[-1]
    assert last.startswith("error: data.train:") and f"part-{bad_file}.parquet" in last and f"row {bad_row} " in last, last
    assert "'text' is empty (null)" in last and "data.bad_rows: skip" in last
    assert not (out / "metrics.json").exists() and not (out / "model").exists()

    # data.bad_rows: skip trains on the rest
    raw = small_job(str(model), {"train": folder, "validation": valid}, tmp_path / "out-skip", data={"bad_rows": "skip"},
                    optim={"batch_size": 64})
    assert main(["train", write(tmp_path / "skip.yaml", raw)]) == 0
    assert (tmp_path / "out-skip" / "metrics.json").is_file()
