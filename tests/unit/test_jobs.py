"""Every job file shipped in jobs/ validates against the schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config.schema import load_job

JOBS = sorted((Path(__file__).parents[2] / "jobs").glob("*.yaml"))


def test_there_are_jobs():
    assert any(p.name == "quickstart.yaml" for p in JOBS)


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_job_file_validates(path):
    job = load_job(path)
    assert job.name and job.model.name
