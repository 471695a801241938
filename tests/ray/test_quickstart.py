"""The quickstart as a user runs it: real all-MiniLM-L6-v2 weights, real fortunes quotes, 2 Ray workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]
JOB = Path(__file__).parents[2] / "jobs" / "quickstart.yaml"


def test_quickstart_reaches_075_test_accuracy(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the job's relative paths (data/, models/) resolve here
    assert main(["data", "quickstart"]) == 0
    assert main(["train", str(JOB), f"output.dir={tmp_path / 'run'}"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.75, metrics["test"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
