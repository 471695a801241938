"""Every job file shipped in jobs/ validates against the schema and resolves to something trainable."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.config.schema import STRATEGY_PRESETS, JobSpec, job_to_yaml, load_job
from engine.tasks import get_task

ROOT = Path(__file__).parents[2]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def test_the_quickstart_jobs_are_shipped():
    assert {"quickstart.yaml", "quickstart_tune.yaml"} <= {p.name for p in JOBS}


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_job_file_validates_and_resolves(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the jobs name their data and output folders from the checkout's root
    job = load_job(path)
    raw = yaml.safe_load(path.read_text())
    task = get_task(job.model.task)
    # the checkpoint metric is one the task reports, and the output folder is the job's own
    assert job.eval_metric in (*task.metrics, "loss"), (job.eval_metric, task.metrics)
    assert job.output_dir == (ROOT / job.output.dir.replace("{name}", job.name)).resolve()
    # the strategy preset filled what the file left unset, and nothing the file set
    finetune = raw.get("finetune") or {}
    for dotted, value in STRATEGY_PRESETS.get(finetune.get("strategy"), {}).items():
        section, key = dotted.split(".")
        given = (raw.get(section) or {}).get(key)
        assert getattr(getattr(job, section), key) == (value if given is None else given), dotted
    # written out with every default (as best_job.yaml is), it reads back as the same job
    assert JobSpec.model_validate(yaml.safe_load(job_to_yaml(job))) == job
