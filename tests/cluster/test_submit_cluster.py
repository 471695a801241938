"""Submission to a real multi-node Ray cluster: a head and 2 worker nodes started by `shoulders cluster up`
as separate `ray start` processes on loopback, with token authentication on. One cluster for the module;
`cluster down` stops only its processes.
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
from cluster.remote import submit
from cluster.cli.main import main
from cluster.remote.local_cluster import LocalCluster, alive_nodes, listening_addresses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (1 CPU) + 2 worker nodes (2 CPUs each), token auth, its own token file, state and temp folders."""
    folder = tmp_path_factory.mktemp("cluster")
    code = main(["cluster", "up", "--workers", "2", "--cpus-per-node", "2", "--head-cpus", "1",
                 "--object-store-mb", "128", "--dir", str(folder)])
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
def job_file(tmp_path_factory, tiny_bert) -> Path:
    """A quickstart-shaped job on the tiny BERT: 2 training workers, SPREAD, storage on a shared path."""
    root = tmp_path_factory.mktemp("job")
    data = tiny.write_topic_data(root / "data", rows=96, files=2)
    path = root / "job.yaml"
    path.write_text(f"""\
name: cluster-topics
model: {{name: {tiny_bert}, labels: [food, sport, tech]}}
data: {{train: {data['train']}, validation: {data['validation']}, test: {data['test']}, max_length: 16, rows_per_block: 24}}
finetune: {{strategy: full}}
optim: {{max_steps: 2, batch_size: 8}}
scaling: {{num_workers: 2, cpus_per_worker: 0.5, placement_strategy: SPREAD}}
output: {{dir: "{root}/out/{{name}}"}}
run: {{storage_path: {root}/storage}}
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


def test_stop_ends_a_running_job_then_a_spread_job_succeeds_on_two_nodes(as_client, job_file, tiny_bert, capsys):
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

    root = job_file.parent
    metrics = json.loads((root / "out" / "cluster-topics" / "metrics.json").read_text())
    node_ids = {n["node_id"] for n in alive_nodes(cluster)}
    assert len(metrics["worker_nodes"]) == 2 and len(set(metrics["worker_nodes"])) == 2
    assert set(metrics["worker_nodes"]) <= node_ids

    # The checkpoint in run.storage_path loads into the model it was trained from.
    import torch
    from transformers import AutoModelForSequenceClassification

    from engine.checkpoints.store import is_complete, load_trainable_state, read_checkpoint

    checkpoints = sorted(p for p in (root / "storage" / "cluster-topics").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and all(is_complete(c) for c in checkpoints)
    saved = read_checkpoint(checkpoints[-1])
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
