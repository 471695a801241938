"""Pure parts of cluster submission: packing and path rewriting, size limit, token and address lookup,
exit codes, the loopback/auth rule, storage location. No Ray cluster is started here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from cluster.remote import submit
from cluster.remote.local_cluster import check_binding
from cluster.preflight.data import check_data
from engine.config.schema import build_job, load_job
from engine.errors import JobError


@pytest.fixture()
def job_file(tmp_path, tiny_bert) -> Path:
    data = tiny.write_topic_data(tmp_path / "data", rows=40, files=2)
    path = tmp_path / "job.yaml"
    path.write_text(
        f"name: packed\nmodel: {{name: {tiny_bert}}}\n"
        f"data: {{train: {data['train']}, validation: {data['validation']}, test: s3://bucket/test.parquet}}\n"
    )
    return path


def test_plan_package_rewrites_local_paths_and_leaves_uris(job_file, tiny_bert):
    package = submit.plan_package(load_job(job_file))
    assert package.job.data.train == "inputs/data.train"  # a folder of 2 parquet parts stays a folder
    assert package.job.data.validation == "inputs/data.validation/validation.parquet"
    assert package.job.data.test == "s3://bucket/test.parquet"
    assert package.job.model.name == "inputs/model.name"
    assert {"inputs/data.train/part-0.parquet", "inputs/data.train/part-1.parquet",
            "inputs/data.validation/validation.parquet", "inputs/model.name/config.json"} <= set(package.files)
    assert package.total_bytes == sum(p.stat().st_size for p in package.files.values())


def test_packed_job_resolves_inside_the_working_dir(job_file, tmp_path, monkeypatch):
    package = submit.plan_package(load_job(job_file).model_copy(update={"data": load_job(job_file).data.model_copy(update={"test": None})}))
    folder = submit.write_package(package, tmp_path / "wd")
    monkeypatch.chdir(folder)
    job = load_job(submit.JOB_FILE)
    info = check_data(job)  # the relative paths resolve from the working_dir, as on the cluster
    assert info.splits["train"].num_rows == 40 and info.splits["validation"].num_rows == 10
    assert (folder / "inputs/model.name/config.json").is_file()


def test_hub_id_is_not_packed():
    job = build_job({"model": {"name": "org/some-model"}, "data": {"train": "s3://b/train.parquet"}})
    package = submit.plan_package(job)
    assert package.files == {} and package.job.model.name == "org/some-model"


def test_missing_local_data_fails_before_any_cluster_is_contacted(job_file, monkeypatch):
    monkeypatch.setattr(submit, "connect", lambda *a, **k: pytest.fail("the cluster was contacted"))
    with pytest.raises(JobError, match=r"data\.train: '.*nowhere\.parquet' does not exist"):
        submit.submit(str(job_file), ["data.train=/nowhere.parquet"], address="http://127.0.0.1:1")


def test_package_over_rays_limit_is_refused_with_advice(job_file):
    package = submit.plan_package(load_job(job_file))
    with pytest.raises(JobError, match=r"total .*model\.name .*over Ray's [0-9.]+ MiB limit.*shared filesystem"):
        submit.check_package_size(package, limit=1000)
    submit.check_package_size(package)  # tiny inputs pass the real limit


def test_token_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert submit.find_token()[0] is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert submit.find_token()[0] == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert submit.find_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.find_token() == ("from-env", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(JobError, match="RAY_AUTH_TOKEN_PATH is .*does not exist"):
        submit.find_token()


def test_address_comes_from_flag_or_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(JobError, match="no cluster address.*RAY_ADDRESS"):
        submit.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:8265")
    assert submit.resolve_address(None) == "http://127.0.0.1:8265"
    assert submit.resolve_address("https://head:443") == "https://head:443"


def test_exit_codes_follow_the_final_state():
    assert [submit.exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING")] == [0, 1, 3, 4, 4]


def test_non_loopback_without_auth_is_refused():
    with pytest.raises(JobError, match="refusing to start a Ray cluster bound to '0.0.0.0' with authentication disabled"):
        check_binding("0.0.0.0", "disabled")
    check_binding("127.0.0.1", "disabled")
    check_binding("0.0.0.0", "token")


def test_runtime_env_ships_this_code_and_declares_packages(tmp_path):
    env = submit.build_runtime_env(tmp_path, ship_code=True, pip=True)
    assert env["working_dir"] == str(tmp_path)
    assert {Path(p).name for p in env["py_modules"]} == {"engine", "cluster"}
    packages = env["pip"]["packages"]
    assert any(p.startswith("torch") for p in packages) and any(p.startswith("transformers") for p in packages)
    assert not any(p.startswith("ray") for p in packages) and not any("extra ==" in p for p in packages)
    assert "py_modules" not in submit.build_runtime_env(tmp_path, ship_code=False)


def test_storage_location(tmp_path):
    from cluster.run.trainer import TRAIN_DIR, storage_location

    base = {"name": "j", "model": {"name": "m"}, "data": {"train": "t.parquet"}, "output": {"dir": str(tmp_path / "out")}}
    assert storage_location(build_job(base)) == (str(tmp_path / "out"), TRAIN_DIR)
    assert storage_location(build_job({**base, "run": {"storage_path": "s3://b/runs"}})) == ("s3://b/runs", "j")
    local = storage_location(build_job({**base, "run": {"storage_path": "rel/store"}}))
    assert local == (os.path.abspath("rel/store"), "j")


def test_submit_module_does_not_import_torch():
    code = "import sys, cluster.remote.submit, cluster.cli.remote, cluster.remote.local_cluster; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class FakeClient:
    """Records what would be sent to the Jobs API, and checks the working_dir while it still exists."""

    def __init__(self):
        self.calls = []

    def submit_job(self, **kwargs):
        folder = Path(kwargs["runtime_env"]["working_dir"])
        kwargs["packed"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        kwargs["job_yaml"] = (folder / submit.JOB_FILE).read_text()
        self.calls.append(kwargs)
        return kwargs["submission_id"]


def test_tune_with_address_submits_the_search(job_file, monkeypatch, capsys):
    from cluster.cli.main import main

    client = FakeClient()
    monkeypatch.setattr(submit, "connect", lambda address=None: client)
    assert main(["tune", str(job_file), "optim.batch_size=4", "--address", "http://127.0.0.1:1"]) == 0
    (call,) = client.calls
    assert call["entrypoint"] == "python -m cluster.cli.main tune job.yaml"
    assert call["submission_id"].startswith("packed-") and capsys.readouterr().out.strip() == call["submission_id"]
    assert "inputs/data.train/part-0.parquet" in call["packed"] and "inputs/model.name/config.json" in call["packed"]
    assert "batch_size: 4" in call["job_yaml"] and "train: inputs/data.train" in call["job_yaml"]
    assert call["metadata"] == {"shoulders_job": "packed", "shoulders_command": "tune"}


def test_submit_command_line_dispatches_to_submit(job_file, monkeypatch, capsys):
    from cluster.cli.main import main

    client = FakeClient()
    monkeypatch.setattr(submit, "connect", lambda address=None: client)
    assert main(["submit", str(job_file), "--address", "http://127.0.0.1:1"]) == 0
    assert main(["submit", str(job_file), "--command", "tune", "--address", "http://127.0.0.1:1"]) == 0
    assert [c["entrypoint"] for c in client.calls] == ["python -m cluster.cli.main train job.yaml", "python -m cluster.cli.main tune job.yaml"]


def test_cluster_up_refuses_open_binding_without_auth(tmp_path, capsys):
    from cluster.cli.main import main

    assert main(["cluster", "up", "--host", "0.0.0.0", "--auth", "disabled", "--dir", str(tmp_path)]) == 2
    assert "refusing to start a Ray cluster bound to '0.0.0.0'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing was started or written
