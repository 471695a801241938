"""Bad input is refused before any worker starts, with the file/key/column and the fix named."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cluster.cli.main import main
from cluster.preflight.job import preflight
from engine.config.schema import build_job
from engine.errors import JobError


@pytest.fixture
def job_dict(tiny_bert, topic_data, tmp_path):
    return {
        "name": "t",
        "model": {"name": str(tiny_bert), "labels": ["food", "sport", "tech"]},
        "data": {k: str(v) for k, v in topic_data.items()},
        "output": {"dir": str(tmp_path / "out")},
    }


def check(raw):
    return preflight(build_job(raw))


def test_a_good_job_passes_and_reports_rows_and_labels(job_dict):
    job, info = check(job_dict)
    assert info.labels == ["food", "sport", "tech"]
    assert info.splits["train"].num_rows == 240 and len(info.splits["train"].files) == 3
    assert job.model.name == job_dict["model"]["name"]


def test_missing_file_names_the_key(job_dict, tmp_path):
    job_dict["data"]["test"] = str(tmp_path / "nope.parquet")
    with pytest.raises(JobError, match=r"data.test: '.*nope.parquet' does not exist"):
        check(job_dict)


def test_missing_column_names_column_key_and_choices(job_dict):
    job_dict["data"]["text_column"] = "sentence"
    with pytest.raises(JobError, match=r"column 'sentence' \(data.text_column\) is not in .*columns are \['label', 'text'\]"):
        check(job_dict)


def test_undeclared_labels_are_named(job_dict):
    job_dict["model"]["labels"] = ["food", "tech"]
    with pytest.raises(JobError, match=r"labels the job does not declare: \['sport'\]"):
        check(job_dict)


def test_labels_are_inferred_when_not_declared(job_dict):
    del job_dict["model"]["labels"]
    assert check(job_dict)[1].labels == ["food", "sport", "tech"]


def test_empty_split_is_refused(job_dict, tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), empty)
    job_dict["data"]["validation"] = str(empty)
    with pytest.raises(JobError, match="data.validation: .* has no rows"):
        check(job_dict)


def test_folder_that_is_not_a_model(job_dict, tmp_path):
    (tmp_path / "notamodel").mkdir()
    job_dict["model"]["name"] = str(tmp_path / "notamodel")
    with pytest.raises(JobError, match="is not a model: it has no config.json"):
        check(job_dict)


def test_task_the_model_cannot_do(job_dict, tmp_path):
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    job_dict["model"]["name"] = str(folder)
    with pytest.raises(JobError, match="is a 'vit' model, which cannot do model.task 'sequence_classification'"):
        check(job_dict)


def test_cli_exits_2_and_writes_nothing(job_dict, tmp_path, capsys):
    job_dict["data"]["label_column"] = "topic"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict))
    assert main(["train", str(path)]) == 2
    assert "column 'topic' (data.label_column)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_full_validate_reads_data_and_model_without_torch(job_dict, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict))
    code = "import sys; from cluster.cli.main import main; rc = main(['validate', sys.argv[1]]); assert 'torch' not in sys.modules; sys.exit(rc)"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "train 240 rows" in proc.stdout
