"""Real runs on a local Ray that must finish or fail fast, while another Ray instance runs on the host
(a model named by hub id, served offline from a local Hugging Face cache, trains in ``test_console_run.py``):

- a bad row deep in a multi-file dataset (past the rows the preflight samples) stops the run within bounded
  time, the last words naming the file and the row, and nothing is exported;
- ``shoulders tune`` as a user runs it (a new process, embedded Ray) beside a ``ray start`` cluster: it exits 0,
  and Ray Train's placement-group cleaner finds its own instance (when it did not, a finished trial's
  reservation was never freed and the next trial waited forever). ``shoulders train`` starts its Ray the same
  way (``cluster.run.trainer.start_embedded_ray``), and every in-process Ray test here runs beside that cluster.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
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


def test_bad_row_deep_in_a_multi_file_dataset_stops_the_run(ray_local, tmp_path, capsys):
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
    from tiny import save_tiny_model

    model = save_tiny_model("bert", tmp_path / "model")
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


def run_cli(args: list[str], cwd: Path, timeout: int) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``shoulders ARGS`` in a new process; returns it and everything it and its Ray instance logged."""
    ray_tmp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths are limited to 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "cluster.cli.main", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    logs = [p.read_text(errors="replace") for p in Path(ray_tmp).rglob("*") if p.is_file() and p.suffix in (".err", ".out", ".log")]
    return proc, "\n".join([proc.stdout, proc.stderr, *logs])


def test_tune_beside_another_ray_instance(other_ray, tiny_bert, topic_data, tmp_path):
    assert other_ray.poll() is None  # the other instance is up
    from ray._private.services import find_gcs_addresses

    assert len(find_gcs_addresses()) >= 1
    raw = small_job(str(tiny_bert), topic_data, tmp_path / "tune-out", optim={"max_steps": 6, "epochs": None}, eval={"every_n_steps": 3}, tune={
        "space": {"finetune.backbone_lr_ratio": {"grid": [0.1, 1.0]}}, "num_samples": 1, "scheduler": "fifo", "max_concurrent_trials": 1,
    })
    proc, logged = run_cli(["tune", write(tmp_path / "tune.yaml", raw)], tmp_path, 420)
    assert proc.returncode == 0, f"tune exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    assert "multiple active Ray instances" not in logged  # the console, and every log of its Ray instance
    rows = list(csv.DictReader(open(tmp_path / "tune-out" / "tune_results.csv")))
    assert len(rows) == 2 and all(not row.get("error") for row in rows), rows  # the second trial ran: the first one's reservation was freed
    assert (tmp_path / "tune-out" / "report.md").is_file()
