"""A node lost mid-run on a real multi-node Ray cluster (``shoulders cluster up`` on loopback), data and
checkpoints in the S3 bucket: the raylet of one worker node is SIGKILLed (its workers and tasks die with it).

The cluster: head 1 CPU, a 2-CPU worker node and two 1-CPU worker nodes, private disks. Jobs: the tiny BERT, 120 training
rows with sample ids, 2 workers, 2 epochs of 4 optimizer steps, a checkpoint every 2 steps, ``max_failures=1``.

- training workers of 1 CPU placed STRICT_PACK fit only on the 2-CPU node: both workers are there, and the
  1-CPU nodes run only Ray Data tasks (the controller, the split coordinator and the console queue are pinned
  to the head, the driver's node). Killing a 1-CPU node that ran the job's data tasks: the job succeeds;
  Ray Data re-runs the lost tasks elsewhere, and when a block a worker still needed was lost with the node
  Ray Train restarts the workers from the last checkpoint (both were seen).
- half-CPU workers placed SPREAD: killing a worker node holding one of them, Ray Train restarts the group
  from the last checkpoint in the bucket and the run ends bit-for-bit where the data-node run ends (the
  ingest order is deterministic: ``preserve_order`` streaming split, the same blocks in the same order on
  every execution, and a resumed rank skips exactly the batches its checkpoint trained on).
- 1-CPU STRICT_PACK workers, killing the 2-CPU node: no node left can hold both; the job fails within
  ``scaling.node_loss_timeout_s`` plus the abort with one line naming the node and ``shoulders submit ... --resume``.

After each kill a fresh node of the same size joins, so the next test sees the same layout. Measured on the
2-core machine in a full CI run: cluster up 26 s, data node 76 s, training node 89 s, too few nodes 106 s (80 s
since the abort grace is 15 s: the job FAILED 40 s after the kill).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import requests

from cluster.cli.main import main
from cluster.remote import submit
from cluster.remote.local_cluster import (
    LocalCluster,
    NodeProcess,
    _spawn,
    alive_nodes,
    auth_headers,
    cluster_processes,
    node_command,
    node_env,
    node_temp_dir,
    wait_for_nodes,
)
from cluster.run.node_loss import ABORT_GRACE_S

sys.path.insert(0, str(Path(__file__).parents[1] / "ray"))
from resume_helpers import (  # noqa: E402
    assert_each_id_once_per_epoch,
    assert_same_training,
    final_state_in_bucket,
    id_job,
    write_id_data,
)

pytestmark = pytest.mark.slow

EPOCHS, ROWS_PER_RANK = 2, 60
TIMEOUT_S = 10
"""``scaling.node_loss_timeout_s`` of the job that cannot recover."""
CLUSTER_ENV = {
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",  # 32 footer-reader actors per read otherwise: minutes on 2 cores
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
}


def add_node(cluster: LocalCluster, cpus: int, role: str) -> NodeProcess:
    """Start one more worker node of ``cpus`` CPUs (its own temp folder) and wait until it is alive."""
    host, port = cluster.gcs_address.rsplit(":", 1)
    env = node_env("token" if cluster.token_path else "disabled", Path(cluster.token_path) if cluster.token_path else None, cluster.gcs_address)
    cmd = node_command(False, host, int(port), cpus, node_temp_dir(cluster.temp_dir, role, cluster.private_disks), 128)
    count = len(alive_nodes(cluster))
    node = _spawn(role, cmd, env, cluster, [])
    cluster.nodes.append(node)
    cluster.save()  # `cluster down` stops it too
    wait_for_nodes(LocalCluster(**{**cluster.__dict__, "nodes": [node]}), count + 1, 120)  # the killed nodes' processes are gone
    return node


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """Head 1 CPU + worker nodes of 2, 1 and 1 CPUs, each with its own disk (``--private-disks``: the storage
    credentials reach the jobs only through their runtime environment)."""
    folder = tmp_path_factory.mktemp("loss-cluster")
    saved = {k: os.environ.get(k) for k in CLUSTER_ENV}
    os.environ.update(CLUSTER_ENV)
    try:
        assert main(["cluster", "up", "--workers", "1", "--cpus-per-node", "2", "--head-cpus", "1",
                     "--object-store-mb", "128", "--dir", str(folder), "--private-disks"]) == 0
        state = LocalCluster.load(folder)
        add_node(state, 1, "small1")
        add_node(state, 1, "small2")
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    try:
        yield LocalCluster.load(folder)
    finally:
        assert main(["cluster", "down", "--dir", str(folder)]) == 0


@pytest.fixture()
def client_env(cluster, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    for key, value in cluster.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SHOULDERS_FAULTS", json.dumps({"step_sleep_s": 2}))  # steps slow enough to kill mid-run
    return cluster


@pytest.fixture(scope="module")
def bucket_data(s3, tmp_path_factory):
    from s3_server import upload

    local = write_id_data(tmp_path_factory.mktemp("loss-data"))
    return {k: upload(s3, v, "loss-data", Path(v).name) for k, v in local.items()}


FINALS: dict[str, dict] = {}
"""Final checkpoint state of each finished run, by test."""


def write_job(tmp: Path, name: str, model: Path, data: dict, s3, **scaling) -> Path:
    import yaml

    job = id_job(name, model, data, tmp / "out", EPOCHS, max_failures=1, **scaling)
    job["run"] = {"storage_path": s3.uri("loss-runs")}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def submit_job(capsys, job: Path) -> str:
    capsys.readouterr()
    assert main(["submit", str(job)]) == 0
    return capsys.readouterr().out.strip().splitlines()[0]


def state_api(cluster: LocalCluster, what: str) -> list[dict]:
    reply = requests.get(f"{cluster.address}/api/v0/{what}?limit=10000", headers=auth_headers(cluster.token_path), timeout=30)
    reply.raise_for_status()
    return reply.json()["data"]["result"]["result"]


def training_nodes(cluster: LocalCluster) -> set[str]:
    return {a["node_id"] for a in state_api(cluster, "actors") if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"}


def head_node(cluster: LocalCluster) -> str:
    return next(n["node_id"] for n in alive_nodes(cluster) if n["is_head_node"])


def node_cpus(cluster: LocalCluster, node_id: str) -> int:
    return int(next(n["resources_total"]["CPU"] for n in alive_nodes(cluster) if n["node_id"] == node_id))


def kill_raylet(cluster: LocalCluster, node_id: str) -> None:
    """SIGKILL the raylet of ``node_id`` (found among the cluster's processes by its ``--node_id``)."""
    raylets = [p for p in cluster_processes(cluster) if p.name() == "raylet" and f"--node_id={node_id}" in p.cmdline()]
    assert len(raylets) == 1, [p.cmdline()[:3] for p in raylets]
    raylets[0].send_signal(signal.SIGKILL)


def wait_for_checkpoint(cluster: LocalCluster, job_id: str, run: str, step: int, timeout_s: float = 300) -> None:
    """Until the run's step-``step`` checkpoint is complete in the bucket (the job still running)."""
    from resume_helpers import bucket_checkpoints, bucket_incomplete_reason

    client = submit.connect(cluster.address)
    deadline = time.monotonic() + timeout_s
    name = f"checkpoint_{step:09d}_000"
    while time.monotonic() < deadline:
        done = [c for c in bucket_checkpoints(run) if c.endswith(name) and bucket_incomplete_reason(c) is None]
        if done:
            return
        assert submit.job_status(client, job_id) not in submit.FINAL_STATES, client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    raise AssertionError(f"no complete {name} in {run} after {timeout_s} s")


def wait_final(cluster: LocalCluster, job_id: str, timeout_s: float) -> tuple[str, str]:
    client = submit.connect(cluster.address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = submit.job_status(client, job_id)
        if state in submit.FINAL_STATES:
            return state, client.get_job_logs(job_id)
        time.sleep(1)
    raise AssertionError(f"job {job_id} not finished after {timeout_s} s:\n{client.get_job_logs(job_id)[-3000:]}")


def controller_errors(cluster: LocalCluster) -> list[str]:
    """The error lines of Ray Train's controller logs on the head (why it restarted a worker group)."""
    found = []
    for path in Path(cluster.dir, "nodes", "head").rglob("logs/train/*controller*"):  # the head's private /tmp
        found += [line[:300] for line in path.read_text(errors="replace").splitlines() if "Error" in line or "error" in line]
    return found[-6:]


def checkpoint_steps(run: str) -> list[tuple[int, int]]:
    """(step, restart) of every complete checkpoint in the run folder."""
    from resume_helpers import bucket_checkpoints, bucket_incomplete_reason

    from engine.checkpoints import storage

    names = [storage.name(c) for c in bucket_checkpoints(run) if bucket_incomplete_reason(c) is None]
    return sorted((int(n.split("_")[1]), int(n.split("_")[2])) for n in names)


def test_losing_a_node_that_ran_only_data_tasks_the_run_goes_on(client_env, s3, tiny_bert, bucket_data, tmp_path, capsys):
    cluster = client_env
    run = s3.uri("loss-runs", "data-node")
    job_id = submit_job(capsys, write_job(tmp_path, "data-node", tiny_bert, bucket_data, s3, cpus_per_worker=1.0, placement_strategy="STRICT_PACK"))
    wait_for_checkpoint(cluster, job_id, run, 2)
    trainers, head = training_nodes(cluster), head_node(cluster)
    assert len(trainers) == 1 and node_cpus(cluster, next(iter(trainers))) == 2  # both workers on the 2-CPU node
    # The 1-CPU node that ran most of this job's Ray Data tasks (reads, tokenizing, repartitioning); no worker there.
    data_tasks = [t for t in state_api(cluster, "tasks") if t["type"] == "NORMAL_TASK" and t.get("node_id") not in trainers | {head, None}]
    assert data_tasks, "no Ray Data task ran on a 1-CPU node"
    victim = max({t["node_id"] for t in data_tasks}, key=lambda n: sum(t["node_id"] == n for t in data_tasks))
    killed_at = time.monotonic()
    kill_raylet(cluster, victim)
    state, logs = wait_final(cluster, job_id, 400)
    assert state == "SUCCEEDED", logs[-4000:]
    print(f"data node {victim[:12]} killed; job ended {time.monotonic() - killed_at:.0f} s later")
    assert f"node {victim[:12]} " in logs and "was lost after step" in logs  # the driver said so
    steps = checkpoint_steps(run)
    assert [s for s, _ in steps] == [2, 4, 6, 8]  # each step's checkpoint once, to the end
    final = final_state_in_bucket(run, tmp_path)
    # Blocks the lost node held and a worker still needed may not be rebuilt by Ray Data: then Ray Train
    # restarts the (untouched) workers from the last checkpoint, as for a lost worker node.
    restarts = final["state"]["train"]["restarts"]
    print(f"training restarts: {restarts}; Ray Train's controller said: {controller_errors(cluster)}")
    assert restarts in (0, 1) and {r for _, r in steps} == set(range(restarts + 1))
    assert_each_id_once_per_epoch(final["ids"], EPOCHS, ROWS_PER_RANK)
    FINALS["data-node"] = final
    add_node(cluster, 1, "small3")


def test_losing_a_training_workers_node_resumes_from_the_bucket_and_ends_as_uninterrupted(client_env, s3, tiny_bert, bucket_data, tmp_path, capsys):
    cluster = client_env
    run = s3.uri("loss-runs", "worker-node")
    job_id = submit_job(capsys, write_job(tmp_path, "worker-node", tiny_bert, bucket_data, s3, cpus_per_worker=0.5, placement_strategy="SPREAD"))
    wait_for_checkpoint(cluster, job_id, run, 4)
    victim = next(iter(training_nodes(cluster) - {head_node(cluster)}))
    cpus = node_cpus(cluster, victim)
    killed_at = time.monotonic()
    kill_raylet(cluster, victim)
    state, logs = wait_final(cluster, job_id, 400)
    assert state == "SUCCEEDED", logs[-4000:]
    print(f"training node {victim[:12]} killed; job ended {time.monotonic() - killed_at:.0f} s later")
    assert f"node {victim[:12]} " in logs
    steps = checkpoint_steps(run)
    assert len({s for s, _ in steps}) == len(steps) and steps[-1][0] == 8  # each step once, to the end
    before = [s for s, r in steps if r == 0]
    after = [s for s, r in steps if r == 1]
    assert before and after and after[0] == before[-1] + 2  # resumed from the last checkpoint before the loss
    final = final_state_in_bucket(run, tmp_path)
    assert final["state"]["train"]["restarts"] == 1
    assert_each_id_once_per_epoch(final["ids"], EPOCHS, ROWS_PER_RANK)
    if "data-node" in FINALS:  # bit-for-bit the data-node run (uninterrupted, or resumed as exactly as this one)
        assert_same_training(final, FINALS["data-node"])
    add_node(cluster, cpus, "again")


def test_not_enough_nodes_left_fails_in_bounded_time_with_one_line(client_env, s3, tiny_bert, bucket_data, tmp_path, capsys):
    cluster = client_env
    run = s3.uri("loss-runs", "too-few")
    job = write_job(tmp_path, "too-few", tiny_bert, bucket_data, s3, cpus_per_worker=1.0, placement_strategy="STRICT_PACK",
                    node_loss_timeout_s=TIMEOUT_S)
    job_id = submit_job(capsys, job)
    wait_for_checkpoint(cluster, job_id, run, 2)
    (victim,) = training_nodes(cluster)
    assert node_cpus(cluster, victim) == 2  # the only node that holds both workers
    killed_at = time.monotonic()
    kill_raylet(cluster, victim)
    state, logs = wait_final(cluster, job_id, TIMEOUT_S + 180)
    elapsed = time.monotonic() - killed_at
    print(f"node {victim[:12]} killed; job {state} {elapsed:.0f} s later")
    assert state == "FAILED"
    assert elapsed < TIMEOUT_S + ABORT_GRACE_S + 30, elapsed  # detection, the timeout, the abort grace, the job ending
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, logs[-4000:]
    assert sum("training made no progress" in line for line in logs.splitlines()) == 1  # said once
    assert errors[0].startswith(f"error: node {victim} (") and f"shoulders submit {job} --resume" in errors[0], errors[0]
    assert run in errors[0]  # where the checkpoints are
    assert "Traceback" not in logs[logs.index("was lost after step"):]
