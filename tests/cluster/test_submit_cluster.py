"""Submission to a real multi-node Ray cluster: a head and 2 worker nodes started by `shoulders cluster up
--private-disks` as separate `ray start` processes on loopback, with token authentication on, each node with
its own /tmp, home and working folder (nothing passes between nodes through a local path) and storage in the
loopback S3 server (SeaweedFS). One cluster for the module; `cluster down` stops only its processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import tiny

from cluster.cli.main import main
from cluster.remote import submit
from cluster.remote.local_cluster import LocalCluster, alive_nodes, listening_addresses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_folder(tmp_path_factory) -> Path:
    """A folder every node sees read-only (``cluster up --share``), as a model cache standing in for the hub."""
    folder = tmp_path_factory.mktemp("shared")
    (folder / "note.txt").write_text("seen by every node")
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, shared_folder):
    """Head (1 CPU) + 2 worker nodes (2 CPUs each), token auth, its own token file, state and temp folders,
    private disks."""
    folder = tmp_path_factory.mktemp("cluster")
    code = main(["cluster", "up", "--workers", "2", "--cpus-per-node", "2", "--head-cpus", "1",
                 "--object-store-mb", "128", "--dir", str(folder), "--private-disks", "--share", str(shared_folder)])
    assert code == 0
    try:
        yield LocalCluster.load(folder)
    finally:
        assert main(["cluster", "down", "--dir", str(folder)]) == 0
        assert not (folder / "cluster.json").exists()


@pytest.fixture()
def as_client(cluster, monkeypatch, tmp_path):
    """Point the CLI at the cluster the way a user would (RAY_ADDRESS + RAY_AUTH_TOKEN_PATH), with a HOME
    that holds no token, so nothing falls back to the real ~/.ray/auth_token."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    for key, value in cluster.env().items():
        monkeypatch.setenv(key, value)
    return cluster


@pytest.fixture(scope="module")
def job_file(tmp_path_factory, tiny_bert, s3) -> Path:
    """A quickstart-shaped job on the tiny BERT: 2 training workers, SPREAD; the training split, checkpoints and
    results in the S3 bucket; the validation and test splits and the model local (``submit`` packs them)."""
    from s3_server import upload

    root = tmp_path_factory.mktemp("job")
    data = tiny.write_topic_data(root / "data", rows=96, files=2)
    train = upload(s3, Path(data["train"]), "cluster-data", "train")
    path = root / "job.yaml"
    path.write_text(f"""\
name: cluster-topics
model: {{name: {tiny_bert}, labels: [food, sport, tech]}}
data: {{train: {train}, validation: {data['validation']}, test: {data['test']}, max_length: 16, rows_per_block: 24}}
finetune: {{strategy: full}}
optim: {{max_steps: 2, batch_size: 8}}
scaling: {{num_workers: 2, cpus_per_worker: 0.5, placement_strategy: SPREAD}}
output: {{dir: "{root}/out/{{name}}", uri: "{s3.uri('cluster-results', '{name}')}"}}
run: {{storage_path: {s3.uri('cluster-runs')}}}
""")
    return path


def accuracy_on_test_split(model, tokenizer_dir: Path, test_file: Path) -> tuple[float, int]:
    """Accuracy of ``model`` (labels food, sport, tech) on the job's test split, in fp32, one row at a time."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = pq.read_table(test_file).to_pylist()
    model.eval()
    right = 0
    with torch.no_grad():
        for row in rows:
            logits = model(**tokenizer(row["text"], truncation=True, max_length=16, return_tensors="pt")).logits
            right += ["food", "sport", "tech"][int(logits.argmax())] == row["label"]
    return right / len(rows), len(rows)


def submit_id(capsys, args: list[str]) -> str:
    capsys.readouterr()
    assert main(["submit", *args]) == 0
    return capsys.readouterr().out.strip().splitlines()[0]


def wait_for_log(cluster: LocalCluster, job_id: str, text: str, timeout_s: float) -> str:
    client = submit.connect(cluster.address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = client.get_job_logs(job_id)
        if text in logs:
            return logs
        assert submit.job_status(client, job_id) not in submit.FINAL_STATES, logs[-3000:]
        time.sleep(2)
    raise AssertionError(f"'{text}' not in the logs of {job_id} after {timeout_s} s")


def test_nodes_share_no_local_disk(as_client, shared_folder):
    """A file the job's driver or a task writes below /tmp is seen on its own node only, this machine's /tmp on
    none, a ``--share`` folder on every node, read-only; home and working folder are each node's own."""
    client = submit.connect(as_client.address)
    marker = shared_folder.parent / "host-only.txt"
    marker.write_text("this machine's /tmp")
    job_id = client.submit_job(entrypoint=f"python probe.py {marker} {shared_folder}", runtime_env={"working_dir": str(PROBE_DIR)})
    deadline = time.monotonic() + 120
    while not client.get_job_status(job_id).is_terminal():
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert str(client.get_job_status(job_id)) == "SUCCEEDED", logs[-3000:]
    import json

    seen = json.loads(logs.split("PROBE ")[1].splitlines()[0])
    nodes = seen["nodes"]
    assert len(nodes) == 3 and len({n["node"] for n in nodes}) == 3
    for node in nodes:
        own = {f"written-by-{node['node']}"} | ({"written-by-driver"} if node["node"] == seen["driver"] else set())
        assert set(node["sees"]) == own, nodes
        assert node["host_file"] is False and node["shared"] == "seen by every node" and node["shared_writable"] is False
        assert node["home"] == "/tmp/home"


PROBE_DIR = Path(__file__).parent / "node_probe"


def test_stop_ends_a_running_job_then_a_spread_job_succeeds_on_two_nodes(as_client, job_file, tiny_bert, s3, tmp_path, capsys):
    cluster = as_client
    # 1. A long job: stop it once its training workers run. The cluster stays usable.
    long_id = submit_id(capsys, [str(job_file), "name=long-run", "optim.max_steps=100000"])
    wait_for_log(cluster, long_id, "trainable (", timeout_s=600)  # the console line once training rank 0 started
    assert main(["stop", long_id]) == 0
    assert main(["status", long_id]) == 3  # STOPPED
    assert "STOPPED" in capsys.readouterr().out

    # 2. The quickstart-shaped job with 2 workers placed SPREAD: it succeeds (exit code 0 from --wait).
    assert main(["submit", str(job_file), "--wait"]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[0]
    assert main(["status", job_id]) == 0 and "SUCCEEDED" in capsys.readouterr().out

    # The workers ran on two different nodes of this cluster (node ids all-gathered into metrics.json).
    import json

    from engine.checkpoints import storage

    root = job_file.parent
    assert not (root / "out").exists()  # the driver's output folder is on the head node's own disk
    metrics = json.loads(storage.read_text(s3.uri("cluster-results", "cluster-topics", "metrics.json")))
    assert metrics["export_dir"] == s3.uri("cluster-results", "cluster-topics", "model")
    node_ids = {n["node_id"] for n in alive_nodes(cluster)}
    assert len(metrics["worker_nodes"]) == 2 and len(set(metrics["worker_nodes"])) == 2
    assert set(metrics["worker_nodes"]) <= node_ids

    # The checkpoint in run.storage_path loads into the model it was trained from.
    import torch
    from transformers import AutoModelForSequenceClassification

    from engine.checkpoints.store import (
        is_complete,
        load_trainable_state,
        read_checkpoint,
    )

    listed = storage.list_folder(s3.uri("cluster-runs", "cluster-topics"))
    checkpoints = sorted(c for c, kind in listed if kind == "dir" and storage.name(c).startswith("checkpoint_"))
    assert checkpoints
    local = [storage.download_folder(c, tmp_path / storage.name(c)) for c in checkpoints]
    assert all(is_complete(c) for c in local)
    saved = read_checkpoint(local[-1])
    assert saved["state"]["train"]["step"] == 2
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    load_trainable_state(model, saved["weights"])
    assert torch.equal(model.classifier.weight, saved["weights"]["classifier.weight"])
    # The reported test accuracy is that model's on the 24 test rows (the export is the only checkpoint's
    # weights; the engine may evaluate under autocast, so one near-tie may flip).
    accuracy, rows = accuracy_on_test_split(model, tiny_bert, root / "data" / "test.parquet")
    assert metrics["test"]["accuracy"] * rows == pytest.approx(round(metrics["test"]["accuracy"] * rows), abs=1e-6)
    assert abs(metrics["test"]["accuracy"] - accuracy) <= 1 / rows + 1e-9, (metrics["test"], accuracy)

    # `list` shows both jobs with their final states.
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert f"{long_id}" in listing and "STOPPED" in listing and "SUCCEEDED" in listing

    # Ray's own CLI, given only the lines `cluster status` (like `cluster up`) prints, lists and shows them.
    assert main(["cluster", "status", "--dir", cluster.dir]) == 0
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines() if line.startswith("RAY_"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | printed
    ray_cli = str(Path(sys.executable).parent / "ray")
    listed = subprocess.run([ray_cli, "job", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and job_id in listed.stdout and long_id in listed.stdout, listed.stderr[-2000:]
    logs = subprocess.run([ray_cli, "job", "logs", job_id], env=env, capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and "cluster-topics" in logs.stdout, logs.stderr[-2000:]


def test_wrong_or_missing_token_is_refused_right_token_works(as_client, job_file, monkeypatch, capsys):
    cluster = as_client
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    assert main(["submit", str(job_file), "name=wrong-token"]) == 2
    assert "refused the authentication token from RAY_AUTH_TOKEN" in capsys.readouterr().err
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert main(["list"]) == 2
    assert "requires an authentication token and none was found" in capsys.readouterr().err
    monkeypatch.setenv("RAY_AUTH_TOKEN", Path(cluster.token_path).read_text())
    assert main(["list"]) == 0
    assert "wrong-token" not in capsys.readouterr().out  # the refused submission never became a job

    # Without a token the Jobs API answers 401, and it listens on loopback only.
    assert requests.get(f"{cluster.address}/api/jobs/", timeout=10).status_code == 401
    port = int(cluster.address.rsplit(":", 1)[1])
    assert {ip for ip, p, _ in listening_addresses(cluster) if p == port} == {"127.0.0.1"}


def test_missing_local_data_fails_at_submit_time(as_client, job_file, capsys):
    client = submit.connect(as_client.address)
    before = {job.submission_id for job in client.list_jobs()}
    code = main(["submit", str(job_file), "name=missing-data", "data.train=/no/such/train.parquet"])
    assert code == 2
    assert "data.train: '/no/such/train.parquet' does not exist" in capsys.readouterr().err
    assert {job.submission_id for job in client.list_jobs()} == before


def test_local_folders_on_nodes_without_a_shared_disk_fail_in_seconds_naming_the_fix(as_client, job_file, capsys):
    """Checkpoints and the export in the driver's local output folder cannot work when the nodes share no disk:
    the job fails before any training worker starts, in one line naming the key, a node that does not see the
    folder and the fix."""
    started = time.monotonic()
    code = main(["submit", str(job_file), "name=local-folders", "run.storage_path=null", "output.uri=null", "--wait"])
    elapsed = time.monotonic() - started
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert code == 1, text[-3000:]
    line = next(line for line in text.splitlines() if "does not see it" in line)
    assert "output.dir (the checkpoints: run.storage_path is unset)" in line and "set run.storage_path to an object-storage URI" in line
    assert "trainable (" not in text  # no training worker started
    assert elapsed < 120, elapsed
