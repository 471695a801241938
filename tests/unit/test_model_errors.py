"""A model the machine cannot find is refused in one line that says where it was looked up and how to fix it."""

from __future__ import annotations

import yaml
from huggingface_hub import constants

from cluster.cli.main import main


def validate(tmp_path, model: str, topic_data, capsys) -> tuple[int, list[str]]:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "m", "model": {"name": model}, "data": {k: str(v) for k, v in topic_data.items()},
                                   "output": {"dir": str(tmp_path / "out")}}))
    code = main(["validate", str(job)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_hub_id_not_cached_offline_is_one_short_line_with_both_fixes(tmp_path, topic_data, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, lines = validate(tmp_path, "nosuch-org/nosuch-model", topic_data, capsys)
    assert code == 2
    assert len(lines) == 1, lines
    message = lines[0].removeprefix("error: ")
    assert len(message) < 200, (len(message), message)
    assert "'nosuch-org/nosuch-model'" in message
    assert "`hf download nosuch-org/nosuch-model" in message and "local folder" in message
    assert constants.HF_HUB_CACHE.split("/.cache/")[-1] in message  # the cache folder looked in (home shown as ~)
    assert "Internet connection" not in message


def test_relative_folder_that_is_no_folder_names_the_working_directory(tmp_path, topic_data, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, lines = validate(tmp_path, "./models/my-model", topic_data, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "'./models/my-model' does not exist" in lines[0]
    assert f"working directory {tmp_path}" in lines[0] and "not a hub id" in lines[0]


def test_short_hub_id_offline_names_the_working_directory_and_a_local_dir(tmp_path, topic_data, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code, lines = validate(tmp_path, "tiny-model", topic_data, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f"no folder in {tmp_path}" in lines[0] or "no local folder" in lines[0]
    assert "`hf download tiny-model" in lines[0]
