"""``shoulders tune`` and the safeguards on a local Ray with tiny models.

- a 2-trial grid over the backbone LR ratio: results file, best job, report and plots; the drift
  rises from ratio 0.01 to 1 (the ratio drives how far the backbone moves);
- gradual unfreezing in a 2-worker DDP run: the trainable set grows on schedule;
- the tune driver killed mid-search and ``--resume``d: finished trials are not rerun, the unfinished one
  continues from its checkpoint; the search's experiment and its trials' runs are in an S3 bucket. Both runs
  are ``shoulders tune`` as a user runs it (a new process, embedded Ray) beside a ``ray start`` instance: one
  trial at a time, so the second trial starting proves the first one's reservation was freed (Ray Train's
  placement-group cleaner found its own instance), and no log says "multiple active Ray instances".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from figures import assert_drawn_png, figure_pixels
from cluster.cli.main import main
from cluster.tune.report import read_results_csv
from engine.checkpoints.store import is_complete

pytestmark = [pytest.mark.slow, pytest.mark.ray]
LABELS = ["food", "sport", "tech"]


def tiny_job(model, data, out, **sections):
    raw = {
        "name": "tiny-tune",
        "model": {"name": str(model), "labels": LABELS},
        "data": {**{k: str(v) for k, v in data.items()}, "max_length": 16, "rows_per_block": 64},
        "finetune": {"strategy": "full", "head_lr": 1e-2, "backbone_lr_ratio": 0.5},
        "optim": {"epochs": 3, "batch_size": 16, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.45},
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def write_job(path: Path, raw) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_grid_over_lr_ratio_reports_and_forgetting_rises(ray_local, tiny_bert, topic_data, tmp_path):
    out = tmp_path / "out"
    raw = tiny_job(tiny_bert, topic_data, out, tune={
        "space": {"finetune.backbone_lr_ratio": {"grid": [0.01, 1.0]}}, "num_samples": 1, "scheduler": "fifo",
    })
    assert main(["tune", write_job(tmp_path / "job.yaml", raw)]) == 0
    rows = read_results_csv(out / "tune_results.csv")
    assert len(rows) == 2 and {r["finetune.backbone_lr_ratio"] for r in rows} == {"0.01", "1.0"}
    assert all(r["iterations"] == "3" and r["stopped_early"] == "False" and not r["error"] for r in rows)
    drift = {float(r["finetune.backbone_lr_ratio"]): float(r["drift"]) for r in rows}  # no retention_data: target rows
    assert 0.0 <= drift[0.01] < drift[1.0]  # the backbone LR ratio drives how far the backbone moves
    assert_drawn_png(out / "metric_vs_lr_ratio.png", figure_pixels((6.5, 4.2)))
    assert_drawn_png(out / "learning_curves.png", figure_pixels((7, 4.0 + 0.22 * 2)))  # one curve per trial
    from engine.config.schema import load_job

    best = load_job(out / "best_job.yaml")
    assert best.finetune.backbone_lr_ratio == float(rows[0]["finetune.backbone_lr_ratio"])
    report = (out / "report.md").read_text()
    assert "drift on target data" in report and "train/validation loss gap" in report and "Recommendation" in report
    assert "## Transfer verdict" in report and (out / "transfer.json").is_file()  # judged against chance, no twin
    assert (out / "model" / "config.json").exists()  # the best trial exported and tested


def test_gradual_unfreezing_in_two_worker_ddp_run(ray_local, tiny_bert, topic_data, tmp_path):
    out = tmp_path / "out"
    raw = tiny_job(tiny_bert, topic_data, out, finetune={"freeze_depth": "all"},
                   safeguards={"unfreeze_every_steps": 8}, eval={"every_n_steps": 4},
                   scaling={"num_workers": 2, "cpus_per_worker": 0.5}, optim={"epochs": 2})
    raw["finetune"].pop("strategy")
    assert main(["train", write_job(tmp_path / "job.yaml", raw)]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    frozen = [(h["step"], h["frozen_blocks"], h["trainable_params"]) for h in history]
    # 2 workers x 120 rows / 16 = 8 steps per epoch: evals at 4, 8, 12, 16; one block unfreezes every 8 steps
    assert [f[1] for f in frozen] == [2, 1, 1, 0]
    params = [f[2] for f in frozen]
    assert params[0] < params[1] == params[2] < params[3]


def run_cli(args, env, log):
    return subprocess.Popen([sys.executable, "-m", "cluster.cli.main", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).parents[2], start_new_session=True)


def checkpoints(trial_dir: Path) -> dict[str, tuple[int, float]]:
    """Complete checkpoint folder -> (step, modification time) of a trial's Train run."""
    found = {}
    for state in trial_dir.glob("train/checkpoint_*/state.json"):
        if not is_complete(state.parent):
            continue
        try:
            found[state.parent.name] = (json.loads(state.read_text())["train"]["step"], state.stat().st_mtime)
        except (OSError, ValueError, KeyError):
            continue
    return found


def kill_session(proc: subprocess.Popen, ray_tmp: Path) -> None:
    """Kill the driver (SIGKILL, no cleanup), then the Ray processes it started (found by their temp dir)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if str(ray_tmp).encode() in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def bucket_trials(trials_root: str) -> dict[str, dict[str, tuple[int, float]]]:
    """Trial id -> its complete checkpoints in the bucket (name -> (step, modification time))."""
    from engine.checkpoints import storage
    from engine.checkpoints.store import RunFolder

    found = {}
    for trial, kind in storage.list_folder(trials_root):
        if kind != "dir":
            continue
        run = storage.join(trial, f"tiny-tune-{storage.name(trial)}")
        folder = RunFolder.at(run)
        checkpoints = {}
        for path in folder.checkpoints():
            if folder.incomplete_reason(path) is not None:
                continue
            info = folder.filesystem.get_file_info(f"{path}/state.json")
            with folder.filesystem.open_input_stream(f"{path}/state.json") as stream:
                checkpoints[storage.name(path)] = (json.loads(stream.read())["train"]["step"], info.mtime.timestamp())
        found[storage.name(trial)] = checkpoints
    return found


def ray_logs(ray_tmp: Path) -> str:
    """Everything the Ray instances started under ``ray_tmp`` logged."""
    return "\n".join(p.read_text(errors="replace") for p in ray_tmp.rglob("*") if p.is_file() and p.suffix in (".err", ".out", ".log"))


MULTIPLE_RAYS = "multiple active Ray instances"


def test_killed_search_resumes_from_object_storage_without_rerunning_finished_trials(s3, other_ray, tiny_bert, topic_data, tmp_path):
    """The search's experiment and its trials' Train runs in the S3 bucket (``run.storage_path``), beside another Ray instance."""
    assert other_ray.poll() is None  # another Ray instance runs on this host: shoulders' own must not confuse it
    from ray._private.services import find_gcs_addresses

    from engine.checkpoints import storage

    assert len(find_gcs_addresses()) >= 1

    out = tmp_path / "out"
    trials_root = s3.uri("tune-runs", "tiny-tune", "trials")
    raw = tiny_job(tiny_bert, topic_data, out, run={"storage_path": s3.uri("tune-runs")}, tune={
        "space": {"finetune.backbone_lr_ratio": {"grid": [0.05, 0.8]}}, "num_samples": 1, "scheduler": "fifo",
        "max_concurrent_trials": 1,  # one trial at a time: the first has finished when the second is cut short
    })
    job_path = write_job(tmp_path / "job.yaml", raw)
    ray_tmp = Path(tempfile.mkdtemp(prefix="shtune", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "SHOULDERS_FAULTS": json.dumps({"step_sleep_s": 0.15})}  # room to interrupt between a trial's checkpoints
    env.pop("RAY_ADDRESS", None)
    planned = 45  # 240 rows / 16 per step x 3 epochs on one worker
    with open(tmp_path / "first.log", "w") as log:
        proc = run_cli(["tune", job_path], env, log)
        try:
            deadline = time.time() + 1200  # generous: trials start slowly on a loaded 2-core machine
            while time.time() < deadline and proc.poll() is None:
                trials = bucket_trials(trials_root)
                done = [t for t, c in trials.items() if any(step == planned for step, _ in c.values())]
                partial = [t for t, c in trials.items() if c and t not in done]
                if done and partial:
                    break
                # a trial that cannot find its own instance never frees its reservation: fail now, not at the deadline
                assert MULTIPLE_RAYS not in (tmp_path / "first.log").read_text(errors="replace"), (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.5)
            assert proc.poll() is None, "the search finished before it could be interrupted"
            assert done and partial, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            kill_session(proc, ray_tmp)
    killed_at = time.time()
    before = bucket_trials(trials_root)
    for trial in partial:  # as if the driver had died before Ray registered them: the folders are what count
        snapshot = storage.join(trials_root, trial, f"tiny-tune-{trial}", "checkpoint_manager_snapshot.json")
        if storage.exists(snapshot):
            storage.resolve(snapshot)[0].delete_file(storage.resolve(snapshot)[1])
    assert not (out / "tune_results.csv").exists()

    with open(tmp_path / "resume.log", "w") as log:
        proc = run_cli(["tune", job_path, "--resume"], env, log)
        try:
            assert proc.wait(timeout=1200) == 0, (tmp_path / "resume.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                kill_session(proc, ray_tmp)
    logged = "\n".join([(tmp_path / "first.log").read_text(errors="replace"), (tmp_path / "resume.log").read_text(errors="replace"), ray_logs(ray_tmp)])
    assert MULTIPLE_RAYS not in logged  # the console of both runs, and every log of their Ray instances
    assert (out / "report.md").is_file()
    rows = read_results_csv(out / "tune_results.csv")
    assert len(rows) == 2 and all(r["last_step"] == str(planned) and not r["error"] for r in rows)
    assert all(r["iterations"] == "3" for r in rows)  # the resumed trial's evaluations from before the kill count too
    after = bucket_trials(trials_root)
    assert storage.exists(s3.uri("tune-runs", "tiny-tune", "tune"))  # the experiment itself is in the bucket too
    assert set(before) <= set(after) and len(after) == 2
    for trial in done:  # finished before the kill: untouched, not rerun
        assert after[trial] == before[trial]
    for trial in partial:  # unfinished: its checkpoints kept, continued from the latest, no step trained twice
        assert set(before[trial]) <= set(after[trial])
        steps = sorted(step for step, _ in after[trial].values())
        assert steps == sorted(set(steps)) and steps[-1] == planned
        first_new = min(mtime for name, (_, mtime) in after[trial].items() if name not in before[trial])
        assert first_new > killed_at
        assert min(s for s, _ in before[trial].values()) == steps[0]
        # written by a run restored from a checkpoint (a fresh start would number its folders _000); the
        # workers' "resumed from step" log line is not asserted: Ray's log forwarding may drop it
        assert all(not name.endswith("_000") for name in set(after[trial]) - set(before[trial]))
    shutil.rmtree(ray_tmp, ignore_errors=True)
