"""Exact resume: a worker SIGKILLed mid-epoch, a driver killed and resumed with ``--resume``, and a
checkpoint cut short while written. Each run must end bit-for-bit where an uninterrupted run ends, having
trained on every sample id exactly once per epoch.

2 CPU workers x 0.5 CPU, tiny BERT (dropout on), 120 training rows -> 60 per worker, 8 micro-batches of 8
per epoch, 2 micro-batches per optimizer step -> 4 steps per epoch, 2 epochs; a checkpoint every 2 steps,
so step 2 and step 6 checkpoints are in the middle of an epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from resume_helpers import (
    assert_each_id_once_per_epoch,
    assert_same_training,
    bucket_checkpoints,
    bucket_incomplete_reason,
    checkpoints,
    final_state,
    final_state_in_bucket,
    id_job,
    kill_driver,
    start_driver,
    wait_for,
    write_id_data,
    write_job,
)

from cluster.cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]

EPOCHS, ROWS_PER_RANK = 2, 60


@pytest.fixture(scope="module")
def id_data(tmp_path_factory):
    return write_id_data(tmp_path_factory.mktemp("id-data"))


def resume_job(model, data, out, **scaling) -> dict:
    return id_job("resume", model, data, out, EPOCHS, cpus_per_worker=0.5, **scaling)


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tiny_bert, id_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    assert main(["train", write_job(tmp / "job.yaml", resume_job(tiny_bert, id_data, tmp / "out"))]) == 0
    return final_state(tmp / "out")


def test_uninterrupted_run_sees_each_id_once_per_epoch(uninterrupted):
    assert uninterrupted["state"]["train"]["step"] == 8
    assert_each_id_once_per_epoch(uninterrupted["ids"], EPOCHS, ROWS_PER_RANK)


def test_worker_sigkilled_mid_epoch_recovers_exactly(ray_local, tiny_bert, id_data, uninterrupted, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv("SHOULDERS_FAULTS", json.dumps({"kill_at_step": 3, "kill_rank": 1, "kill_marker": str(marker), "kill_delay_s": 6}))
    job = resume_job(tiny_bert, id_data, tmp_path / "out", max_failures=1)
    assert main(["train", write_job(tmp_path / "job.yaml", job)]) == 0
    assert marker.exists()  # the worker really died after step 3 ...
    restarted = [p.name for p in checkpoints(tmp_path / "out") if p.name.endswith("_001")]
    assert restarted and restarted[0] == "checkpoint_000000004_001"  # ... and the run went on from step 2
    recovered = final_state(tmp_path / "out")
    assert recovered["state"]["train"]["restarts"] == 1
    assert_same_training(recovered, uninterrupted)
    assert_each_id_once_per_epoch(recovered["ids"], EPOCHS, ROWS_PER_RANK)


def test_killed_driver_resumes_exactly_from_object_storage_past_a_truncated_checkpoint(ray_local, s3, tiny_bert, id_data, uninterrupted, tmp_path):
    """Data and checkpoints in the S3 bucket: the driver SIGKILLed after the step-4 checkpoint, Ray's record of the
    run removed, the newest checkpoint cut short; ``--resume`` ends bit-for-bit where the local uninterrupted run ends."""
    from s3_server import upload

    from engine.checkpoints import storage

    out = tmp_path / "out"
    data = {k: upload(s3, v, "resume-data", Path(v).name) for k, v in id_data.items()}
    job = resume_job(tiny_bert, data, out)
    job["run"] = {"storage_path": s3.uri("resume-runs")}
    run = s3.uri("resume-runs", "resume")
    job_path = write_job(tmp_path / "job.yaml", job)
    proc = start_driver(job_path, tmp_path, {"step_sleep_s": 0.5})
    try:
        step4 = f"{run}/checkpoint_000000004_000"
        wait_for(lambda: storage.exists(step4) and bucket_incomplete_reason(step4) is None, timeout=600, proc=proc, what="the step-4 checkpoint")
    finally:
        kill_driver(proc)  # Ray may or may not have registered the newest checkpoint yet: resume must not care
    assert not (out / "metrics.json").exists()
    # As if the driver had died before Ray registered any checkpoint: the workers' folders are what count.
    fs, snapshot = storage.resolve(f"{run}/checkpoint_manager_snapshot.json")
    if storage.exists(f"{run}/checkpoint_manager_snapshot.json"):
        fs.delete_file(snapshot)
    # Without --resume the unfinished run is refused; with it, training continues.
    assert main(["train", job_path]) == 2
    # Cut the newest complete checkpoint short, as a crash while writing it would: it must be skipped.
    newest = [c for c in bucket_checkpoints(run) if bucket_incomplete_reason(c) is None][-1]
    step = int(storage.name(newest).split("_")[1])
    assert 4 <= step < 8
    weights = f"{newest}/trainable.safetensors"
    data_bytes = storage.read_bytes(weights)
    storage.write_bytes(weights, data_bytes[: len(data_bytes) // 2])
    assert main(["train", job_path, "--resume"]) == 0  # the workers log the skipped checkpoint
    names = [storage.name(c) for c in bucket_checkpoints(run)]
    assert f"checkpoint_{step:09d}_001" in names  # step trained again from the one before
    assert storage.name(newest) not in names  # the cut-short folder, outside Ray's retention, is removed after the run
    resumed = final_state_in_bucket(run, tmp_path)
    assert resumed["state"]["train"]["restarts"] == 1
    assert_same_training(resumed, uninterrupted)
    assert_each_id_once_per_epoch(resumed["ids"], EPOCHS, ROWS_PER_RANK)
