"""Tracking through TensorBoard and MLflow read back with their own readers; curves.png and report.md of a run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from figures import assert_drawn_png, figure_pixels
from cluster.run.report import write_run_report
from cluster.run.tracking import TB_DIR, Tracker
from engine.config.schema import build_job

HISTORY = [
    {"step": s, "epoch": 0, "train_loss": 1.0 / s, "val_loss": 1.2 / s, "val_accuracy": 0.3 + 0.1 * s,
     "tokens_per_s": 900.0 + s, "lr_head": 1e-3 / s, "lr_backbone": 1e-4 / s, "train_val_gap": 0.2 / s}
    for s in (2, 4, 6)
]
LAYOUT = {"parameters": 22115, "trainable": 22115, "total_steps": 6, "eval_every": 2,
          "groups": [{"name": "head", "params": 99, "lr": 1e-3, "weight_decay": 0.01}, {"name": "backbone", "params": 22016, "lr": 1e-4, "weight_decay": 0.01}]}


def run_job(tmp_path: Path, **tracking):
    return build_job({"name": "tracked", "model": {"name": "tiny", "labels": ["a", "b"]}, "data": {"train": "unused.parquet"},
                      "output": {"dir": str(tmp_path / "run")}, "tracking": tracking})


def summary():
    return SimpleNamespace(best=HISTORY[-1], test={"accuracy": 0.875, "loss": 0.4}, history=HISTORY, export_dir=None, layout=LAYOUT)


def replay(tracker: Tracker) -> None:
    """What Ray Train does with the callbacks: one after_report per evaluation, rank 0's metrics first."""
    for callback in tracker.start():
        for row in HISTORY:
            callback.after_report(None, [row, {**row, "train_loss": 99.0}], None)


def test_tensorboard_events_hold_every_reported_metric_per_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = run_job(tmp_path)
    tracker = Tracker(job)
    replay(tracker)
    tracker.finish(summary())
    events = EventAccumulator(str(tmp_path / "run" / TB_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_loss", "val_accuracy", "tokens_per_s", "lr_head", "lr_backbone", "test_accuracy", "best_val_accuracy"} <= tags
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("lr_head")] == [(2, 5e-4), (4, 2.5e-4), (6, round(1e-3 / 6, 6))]
    assert [e.value for e in events.Scalars("train_loss")] == pytest.approx([0.5, 0.25, 1 / 6])  # rank 0's, not rank 1's


def test_mlflow_run_in_a_local_file_store_with_params_metrics_and_files(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    job = run_job(tmp_path, tensorboard=False, mlflow=uri)
    tracker = Tracker(job)
    replay(tracker)
    files = write_run_report(job, SimpleNamespace(splits={"train": SimpleNamespace(num_rows=96)}, labels=["a", "b"]), summary())
    tracker.finish(summary(), list(files))
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["optim.batch_size"] == str(job.optim.batch_size)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == pytest.approx([0.5, 0.7, 0.9])
    assert run.data.metrics["test_accuracy"] == 0.875
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"curves.png", "report.md"}
    assert not (tmp_path / "run" / TB_DIR).exists()  # tensorboard: false


def test_every_run_gets_curves_and_a_report(tmp_path):
    job = run_job(tmp_path, tensorboard=False)
    info = SimpleNamespace(splits={"train": SimpleNamespace(num_rows=96), "validation": SimpleNamespace(num_rows=24)}, labels=["a", "b"])
    curves, report = write_run_report(job, info, summary())
    assert_drawn_png(curves, figure_pixels((13, 3.6)))  # loss, metric and LR side by side
    text = report.read_text()
    for expected in ("# Training report: tracked", "| train | 96 |", "| validation | 24 |", "| head | 99 | 0.001 | 0.01 | 0.000167 |",
                     "best validation (step 6): val_loss 0.2000, val_accuracy 0.9000", "test (exported model): accuracy 0.8750",
                     "train_val_gap: 0.0333", "![curves](curves.png)", str(tmp_path / "run" / "logs"), "22,115"):
        assert expected in text, expected


def test_forgetting_and_drift_reach_tensorboard_the_report_and_the_console(tmp_path):
    """With a retention set a run reports forgetting of the source and, beside it, drift on target rows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cluster.run.console import eval_line
    from cluster.run.summary import print_summary

    history = [{**row, "forgetting": 0.05 * row["step"], "retention_cka": 1 - 0.05 * row["step"], "drift": 0.02 * row["step"]}
               for row in HISTORY]
    run = SimpleNamespace(best=history[-1], test={"accuracy": 0.875}, history=history, export_dir=None, layout=LAYOUT)
    job = build_job({"name": "tracked", "model": {"name": "tiny", "labels": ["a", "b"]}, "data": {"train": "unused.parquet"},
                     "output": {"dir": str(tmp_path / "run")}, "safeguards": {"retention_data": "general.parquet"}})
    tracker = Tracker(job)
    for callback in tracker.start():
        for row in history:
            callback.after_report(None, [row], None)
    tracker.finish(run)
    events = EventAccumulator(str(tmp_path / "run" / TB_DIR))
    events.Reload()
    assert [round(e.value, 6) for e in events.Scalars("forgetting")] == [0.1, 0.2, 0.3]
    assert [round(e.value, 6) for e in events.Scalars("drift")] == [0.04, 0.08, 0.12]
    info = SimpleNamespace(splits={"train": SimpleNamespace(num_rows=96)}, labels=["a", "b"])
    text = write_run_report(job, info, run)[1].read_text()
    assert "- forgetting of the source (retention set general.parquet, last evaluation vs step 0; 1 - linear CKA" in text
    assert "): 0.3000" in text and "- drift on target data (first 32 validation rows, last evaluation vs step 0; 1 - linear CKA" in text
    assert "): 0.1200, how far the model moved on the task's own inputs" in text
    assert eval_line(history[-1]).endswith("val_accuracy 0.9000  forgetting 0.3000  drift 0.1200")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_summary(job, run)
    assert "forgetting of the source (retention set general.parquet" in out.getvalue() and "drift on target data" in out.getvalue()


class StandInWandb:
    """The part of ``wandb`` the tracker uses, recording what each run received."""

    def __init__(self):
        self.runs: list[SimpleNamespace] = []
        self.util = SimpleNamespace(generate_id=lambda: "run0001")

    def init(self, **kwargs):
        run = SimpleNamespace(init=kwargs, logged=[], summary={}, finished=None)
        run.log = lambda values, step: run.logged.append((step, dict(values)))
        run.finish = lambda exit_code=0: setattr(run, "finished", exit_code)
        self.runs.append(run)
        return run


def test_wandb_receives_each_evaluation_as_it_comes_then_the_final_metrics(tmp_path, monkeypatch):
    import sys

    wandb = StandInWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    job = run_job(tmp_path, tensorboard=False, wandb="my-project")
    tracker = Tracker(job)
    [callback] = tracker.start()
    callback = __import__("pickle").loads(__import__("pickle").dumps(callback))  # as Ray sends it to the controller
    for i, row in enumerate(HISTORY):
        callback.after_report(None, [row, {**row, "train_loss": 99.0}], None)
        live = wandb.runs[0]
        assert [step for step, _ in live.logged] == [r["step"] for r in HISTORY[:i + 1]]  # logged while the run goes
    assert [values["val_accuracy"] for _, values in live.logged] == pytest.approx([0.5, 0.7, 0.9])
    assert [values["train_loss"] for _, values in live.logged] == pytest.approx([0.5, 0.25, 1 / 6])  # rank 0's
    assert live.init["project"] == "my-project" and live.init["id"] == "run0001" and live.init["config"]["name"] == "tracked"
    tracker.finish(summary())
    assert len(wandb.runs) == 2
    final = wandb.runs[1]
    assert final.init["id"] == "run0001" and final.init["resume"] == "allow"  # the same run, reopened
    assert final.logged == [] and final.summary["test_accuracy"] == 0.875 and final.finished == 0
