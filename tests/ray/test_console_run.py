"""What a user sees: ``shoulders train`` on a quickstart-shaped job (tiny BERT, 2 workers, test split),
run as a subprocess with stdout to a file. Only shoulders speaks, the table is whole, and everything else
is in the run folder: logs, TensorBoard events, curves.png and report.md. The model is named by hub id, as
most users name theirs, served offline from the session's Hugging Face cache through the same preflight and
worker code as a folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import tiny
from figures import assert_drawn_png, figure_pixels

pytestmark = [pytest.mark.slow, pytest.mark.ray]
MAX_LINES = 40


def test_quiet_console_whole_table_and_everything_else_in_the_run_folder(hub_bert, tmp_path):
    assert not Path(hub_bert).exists()  # a hub id, not a folder
    data = tiny.write_topic_data(tmp_path / "data", rows=96)
    run = tmp_path / "run"
    job = tmp_path / "job.yaml"
    job.write_text(f"""\
name: console-check
model: {{name: {hub_bert}, task: sequence_classification, labels: [food, sport, tech]}}
data: {{train: {data['train']}, validation: {data['validation']}, test: {data['test']}, max_length: 16, rows_per_block: 4}}
finetune: {{strategy: full}}
optim: {{epochs: 2, batch_size: 8}}
scaling: {{num_workers: 2, cpus_per_worker: 0.5}}
output: {{dir: "{run}"}}
""")
    ray_tmp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths are limited to 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    for key in ("RAY_ADDRESS", "DS_ACCELERATOR"):  # as a user's shell has them: DeepSpeed must stay quiet on its own
        env.pop(key, None)
    shoulders = str(Path(sys.executable).parent / "shoulders")
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
        done = subprocess.run([shoulders, "train", str(job)], stdout=out, stderr=err, env=env, timeout=800)
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert done.returncode == 0, stderr[-3000:]
    console = stdout.splitlines() + stderr.splitlines()

    # Only shoulders speaks, in few lines: nothing from Ray's workers, the raylet, transformers or DeepSpeed.
    assert len(console) <= MAX_LINES, "\n".join(console)
    for noise in ("(RayTrainWorker", "(raylet)", "(TrainController", "Token authentication", "Setting accelerator", "Running Dataset"):
        assert noise not in stdout + stderr, noise
    assert console[0].startswith("shoulders: job 'console-check'") and any(line.startswith("ray: embedded local Ray") for line in console)
    assert any(line.startswith("model: ") and "trainable" in line for line in console)
    assert sum(line.startswith("eval @ step") for line in console) == 2  # an evaluation per epoch
    assert any(line.startswith("step 12/12 [") for line in console)  # the last progress line
    # The table is whole although the output is a file (no cut at 80 columns, no ellipsis).
    header = next(line for line in console if line.startswith("model  "))
    assert "val_accuracy" in header and "test_accuracy" in header and "…" not in stdout
    assert any(line.startswith("pre-trained ") for line in console)

    # Everything else is in the run folder.
    logs = run / "logs"
    assert f"logs: {logs}" in stdout
    worker_logs = {p.name: p.read_text() for p in logs.glob("worker-*.log")}
    assert set(worker_logs) == {"worker-0.log", "worker-1.log"}
    assert "training 12 steps" in worker_logs["worker-0.log"] and "param group head" in worker_logs["worker-1.log"]
    assert "ray" in (logs / "driver.log").read_text().lower()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))  # tensorboard's own reader, on the run's files
    events.Reload()
    assert {"train_loss", "val_loss", "val_accuracy", "lr_head", "test_accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val_accuracy")] == [6, 12]  # every evaluation, at its step
    assert_drawn_png(run / "curves.png", figure_pixels((13, 3.6)))
    report = (run / "report.md").read_text()
    assert "## Parameter groups" in report and "| head |" in report and "test (exported model): loss" in report
    assert "## Transfer verdict" in report  # the verdict, decided after the run, is in the report too
    saved = json.loads((run / "model" / "shoulders_job.json").read_text())
    assert saved["job"]["model"]["name"] == hub_bert  # the export keeps the hub id, no machine path
