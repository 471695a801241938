"""``cluster up --private-disks``: the script that gives a node its own /tmp, and the local folders a run on a
cluster must find shared. The nodes themselves are tested in tests/cluster/test_submit_cluster.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cluster.cli.main import main
from cluster.remote import private_disks
from cluster.run.shared_disk import local_write_locations
from engine.config.schema import build_job


def test_node_script_binds_shared_folders_below_tmp_read_only_then_mounts_the_node_folder_on_tmp():
    node_tmp = Path("/tmp/c/nodes/w1/tmp")
    script = private_disks.namespace_script(node_tmp, [Path("/tmp/venv"), Path("/work/repo"), Path("/tmp/c")], ["ray", "start", "--block"])
    lines = script.splitlines()
    assert lines[:4] == ["set -e", "mkdir -p /tmp/c/nodes/w1/tmp/venv", "mount --bind /tmp/venv /tmp/c/nodes/w1/tmp/venv",
                         "mount -o remount,bind,ro /tmp/c/nodes/w1/tmp/venv"]
    # outside /tmp stays where it is; a folder holding the node's own folder is not bound into itself
    assert not any("/work/repo" in line or "mount --bind /tmp/c " in line for line in lines)
    assert lines[4:] == ["mount --rbind /tmp/c/nodes/w1/tmp /tmp", "mkdir -p /tmp/home /tmp/work", "cd /tmp/work",
                         "exec ray start --block"]


def test_node_keeps_no_storage_credentials_and_gets_its_own_token_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(private_disks, "unshare_options", lambda: ["--mount"])
    token = tmp_path / "auth_token"
    token.write_text("t0ken")
    env = {"AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://x", "PATH": "/bin", "RAY_AUTH_TOKEN_PATH": str(token)}
    command, node_env = private_disks.private_node(["ray", "start"], env, tmp_path / "nodes" / "head", [], token)
    assert not any(key.startswith("AWS_") for key in node_env)
    assert node_env["HOME"] == "/tmp/home" and node_env["TMPDIR"] == "/tmp" and node_env["RAY_AUTH_TOKEN_PATH"] == private_disks.TOKEN_INSIDE
    copied = tmp_path / "nodes" / "head" / "tmp" / Path(private_disks.TOKEN_INSIDE).name
    assert copied.read_text() == "t0ken" and copied.stat().st_mode & 0o077 == 0
    assert command[-3:-1] == ["sh", "-c"] and command[-1].endswith("exec ray start")


def test_private_disks_really_hide_this_machines_tmp(tmp_path):
    """The script, run as a node runs it: a file in this machine's /tmp is not there, the node's own is."""
    try:
        options = private_disks.unshare_options()
    except Exception as exc:
        pytest.skip(str(exc))
    (tmp_path / "host-file").write_text("host")
    node_tmp = tmp_path / "node" / "tmp"
    node_tmp.mkdir(parents=True)
    (node_tmp / "node-file").write_text("node")
    script = private_disks.namespace_script(node_tmp, [], ["sh", "-c", f"ls /tmp; test ! -e {tmp_path}/host-file && pwd"])
    done = subprocess.run(["unshare", *options, "--propagation", "private", "sh", "-c", script], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(["home", "node-file", "work", "/tmp/work"])


def test_share_needs_private_disks(tmp_path, capsys):
    assert main(["cluster", "up", "--share", str(tmp_path), "--dir", str(tmp_path / "c")]) == 2
    assert "--share" in capsys.readouterr().err and not (tmp_path / "c" / "cluster.json").exists()


def test_local_folders_a_cluster_run_writes():
    raw = {"name": "x", "model": {"name": "org/m", "labels": ["a", "b"]}, "data": {"train": "s3://b/train.parquet"},
           "output": {"dir": "/out/{name}"}}
    assert local_write_locations(build_job(raw), "/out/x") == {
        "output.dir (the checkpoints: run.storage_path is unset)": "/out/x", "output.dir (the export: output.uri is unset)": "/out/x"}
    raw.update(run={"storage_path": "s3://b/runs"}, output={"dir": "/out/{name}", "uri": "s3://b/results/{name}"})
    assert local_write_locations(build_job(raw), "s3://b/runs") == {}
    raw["output"] = {"dir": "/out/{name}", "export": "none"}
    raw["run"] = {"storage_path": "/nfs/runs"}
    assert local_write_locations(build_job(raw), "/nfs/runs") == {"run.storage_path": "/nfs/runs"}


def test_local_folder_a_cluster_search_writes():
    from cluster.run.shared_disk import search_write_locations

    job = build_job({"name": "x", "model": {"name": "org/m", "labels": ["a", "b"]}, "data": {"train": "t.parquet"}})
    assert search_write_locations(job, "/out/x") == {"output.dir (the search: run.storage_path is unset)": "/out/x"}
    assert search_write_locations(job, "s3://b/runs/x") == {}
