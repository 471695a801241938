"""The filesystem layer (``engine.checkpoints.storage``) on local paths and against a real S3 server on loopback
(SeaweedFS, the session's ``s3`` fixture): the preflight reads remote data, checks a bucket in about a second with
one line naming what failed, and reads checkpoint completeness on object storage. No Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.checkpoints import storage
from engine.errors import JobError


def test_local_locations_write_read_list_and_copy(tmp_path):
    target = storage.join(str(tmp_path), "a", "b.txt")
    storage.write_text(target, "hello")
    assert storage.read_text(target) == "hello" and not (tmp_path / "a" / "b.txt.tmp").exists()
    assert storage.file_type(str(tmp_path / "a")) == "dir" and storage.file_type(str(tmp_path / "nope")) == "missing"
    assert storage.list_folder(str(tmp_path)) == [(str(tmp_path / "a"), "dir")]
    copied = storage.upload_folder(tmp_path / "a", str(tmp_path / "c"))
    assert storage.read_text(storage.join(copied, "b.txt")) == "hello"
    with storage.local_folder(str(tmp_path / "c")) as folder:
        assert folder == tmp_path / "c"


def test_uri_joins_keep_the_query_and_names():
    uri = "s3://bucket/runs?endpoint_override=localhost:9000&scheme=http"
    assert storage.join(uri, "job", "checkpoint_1") == "s3://bucket/runs/job/checkpoint_1?endpoint_override=localhost:9000&scheme=http"
    assert storage.name(storage.join(uri, "job")) == "job"
    assert storage.as_location(uri, "bucket/runs/x") == "s3://bucket/runs/x?endpoint_override=localhost:9000&scheme=http"


def test_credentials_in_a_uri_are_refused_and_env_credentials_are_forwarded():
    from engine.config.schema import build_job

    with pytest.raises(JobError, match="run.storage_path.*secret_key.*environment") as info:
        build_job({"name": "x", "model": {"name": "m"}, "data": {"train": "t.parquet"},
                   "run": {"storage_path": "s3://b/r?access_key=AK&secret_key=TOPSECRET"}})
    assert "TOPSECRET" not in str(info.value)
    env = storage.credential_env({"AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://h", "HOME": "/root", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json"})
    assert env == {"AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://h", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json"}


def test_bucket_check_answers_in_about_a_second_naming_what_failed(s3, monkeypatch):
    started = time.monotonic()
    storage.check_writable(s3.uri("runs"), "run.storage_path")
    assert storage.list_folder(s3.uri("runs")) == []  # the probe object was removed
    with pytest.raises(JobError, match=r"^run.storage_path 's3://no-such-bucket/runs' is not writable: the bucket does not exist"):
        storage.check_writable("s3://no-such-bucket/runs", "run.storage_path")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(JobError, match=r"^output.uri '.*' is not writable: access denied.*AWS_SECRET_ACCESS_KEY"):
        storage.check_writable(s3.uri("results"), "output.uri")
    assert time.monotonic() - started < 5


def test_preflight_reads_remote_parquet_folders_globs_and_jsonl_and_finds_bad_rows(s3, tmp_path):
    from cluster.ingest.splits import resolve_files
    from cluster.preflight.data import check_sample, check_split
    from engine.config.schema import build_job

    for i in range(2):
        table = pa.table({"text": [f"row {i} {j}" for j in range(5)], "label": ["a", "b"] * 2 + ["a"]})
        pq.write_table(table, tmp_path / f"part-{i}.parquet")
        storage.write_bytes(s3.uri("pre", "train", f"part-{i}.parquet"), (tmp_path / f"part-{i}.parquet").read_bytes())
    storage.write_text(s3.uri("pre", "notes.txt"), "not data")
    rows = [{"text": "fine", "label": "a"}, {"text": None, "label": "b"}]
    storage.write_text(s3.uri("pre", "bad.jsonl"), "\n".join(json.dumps(r) for r in rows))
    assert resolve_files(s3.uri("pre", "train"), "data.train") == [s3.uri("pre", "train", "part-0.parquet"), s3.uri("pre", "train", "part-1.parquet")]
    assert resolve_files(s3.uri("pre", "train", "*-1.parquet"), "data.train") == [s3.uri("pre", "train", "part-1.parquet")]
    with pytest.raises(JobError, match="data.train: 's3://.*/missing' does not exist"):
        resolve_files(s3.uri("pre", "missing"), "data.train")
    job = build_job({"name": "x", "model": {"name": "m", "labels": ["a", "b"]}, "data": {"train": s3.uri("pre", "train")},
                     "output": {"dir": str(tmp_path / "out")}})
    split = check_split(job, "train", s3.uri("pre", "train"))
    assert split.num_rows == 10 and split.columns == ["label", "text"]
    assert storage.file_sizes(split.files) == [(tmp_path / f"part-{i}.parquet").stat().st_size for i in range(2)]  # the shuffle decision's input
    check_sample(job, split, ["a", "b"])
    bad = check_split(job, "validation", s3.uri("pre", "bad.jsonl"))
    with pytest.raises(JobError, match="bad.jsonl.*row 2"):
        check_sample(job, bad, ["a", "b"])


def test_checkpoint_completeness_is_read_on_object_storage(s3):
    from engine.checkpoints.store import RunFolder, manifest_name

    run = s3.uri("complete", "run")
    folder = storage.join(run, "checkpoint_000000002_000")
    storage.write_bytes(storage.join(folder, "trainable.safetensors"), b"x" * 10)
    storage.write_text(storage.join(folder, manifest_name(0)), json.dumps({"world_size": 2, "files": {"trainable.safetensors": 10}}))
    runs = RunFolder.at(run)
    assert runs.checkpoints() == [storage.resolve(folder)[1]]
    path = runs.checkpoints()[0]
    assert "missing" in runs.incomplete_reason(path)  # rank 1 never wrote its manifest
    storage.write_text(storage.join(folder, manifest_name(1)), json.dumps({"world_size": 2, "files": {}}))
    assert runs.incomplete_reason(path) is None
    storage.write_bytes(storage.join(folder, "trainable.safetensors"), b"x" * 4)
    assert "has 4 bytes" in runs.incomplete_reason(path)
    runs.filesystem.delete_dir(path)  # SeaweedFS keeps listing the emptied prefix: it is no checkpoint
    assert runs.checkpoints() == []


def test_storage_credentials_travel_in_the_runtime_env_of_jobs_that_use_object_storage(monkeypatch, tmp_path):
    from cluster.remote.submit import build_runtime_env, uses_object_storage
    from cluster.run.trainer import storage_runtime_env
    from engine.config.schema import build_job

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    base = {"name": "x", "model": {"name": "m"}, "data": {"train": "t.parquet"}}
    assert not uses_object_storage(build_job(base))
    assert uses_object_storage(build_job({**base, "run": {"storage_path": "s3://b/runs"}}))
    assert uses_object_storage(build_job({**base, "data": {"train": "s3://b/t.parquet"}}))
    assert build_runtime_env(tmp_path, ship_code=False, storage_env=True)["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert "AWS_SECRET_ACCESS_KEY" not in build_runtime_env(tmp_path, ship_code=False)["env_vars"]
    assert storage_runtime_env()["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"  # ray.init to a cluster
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # inside a submitted job: its runtime env already has them
    assert storage_runtime_env() == {}


def test_preprocessing_of_an_export_in_the_bucket_is_copied_once_per_node_without_its_weights(s3, tmp_path, monkeypatch, tiny_bert):
    """What Ray Data's tasks do on a node that has no copy of the export: the tokenizer comes from the bucket."""
    from s3_server import upload

    from engine.models.loading import load_tokenizer

    location = upload(s3, tiny_bert, "exports", "tiny-bert")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    local = storage.preprocessing_source(location)
    files = {p.name for p in (tmp_path / "node-tmp").rglob("*") if p.is_file()}
    assert "config.json" in files and "tokenizer_config.json" in files
    assert not any(name.endswith(storage.WEIGHT_SUFFIXES) for name in files) and (tiny_bert / "model.safetensors").exists()
    assert storage.preprocessing_source(location) == local  # once per node and export
    storage.write_text(storage.join(location, "added.txt"), "a file of a new export at the same URI")
    again = storage.preprocessing_source(location)
    assert again != local and (Path(again) / "added.txt").is_file() and not (Path(local) / "added.txt").exists()
    assert load_tokenizer(location)("apple bread")["input_ids"] == load_tokenizer(str(tiny_bert))("apple bread")["input_ids"]
    assert storage.preprocessing_source(str(tiny_bert)) == str(tiny_bert)
