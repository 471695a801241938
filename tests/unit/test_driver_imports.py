"""The driver-side commands that only look at files or talk to a cluster (``validate``, ``submit``, ``status``,
``logs``, ``stop``, ``list``) never import torch, Ray Train or the worker loop: they answer in about a second,
and a bad job is refused before anything heavy loads. Checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import yaml


def test_validate_and_submit_checks_import_neither_torch_nor_the_loop(tiny_bert, topic_data, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "imports", "model": {"name": str(tiny_bert), "labels": ["food", "sport", "tech"]},
        "data": {k: str(v) for k, v in topic_data.items()}, "output": {"dir": str(tmp_path / "out")},
    }))
    script = textwrap.dedent(f"""
        import json, sys
        from cluster.cli.main import main
        from cluster.cli import remote as cli_remote
        from cluster.remote import submit
        assert main(["validate", {str(job)!r}]) == 0
        assert main(["validate", "--tune", {str(job)!r}]) == 0
        submit.prepare_submission({str(job)!r})
        heavy = ["torch", "ray.train", "ray.data", "engine.loop.recipe", "engine.models.prepare", "peft", "deepspeed"]
        print(json.dumps({{name: name in sys.modules for name in heavy}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(loaded.values()), loaded


def test_status_logs_stop_and_list_import_neither_torch_nor_the_loop():
    """The four cluster commands run against a stand-in Jobs API client (the real one's imports are loaded: only its
    HTTP calls are replaced), so what they import is what a user's ``shoulders status`` imports."""
    script = textwrap.dedent("""
        import json, sys, types
        import ray.job_submission
        from cluster.cli.main import main

        class Client:
            def __init__(self, address, headers=None):
                self.calls = []
            def get_job_status(self, job_id):
                return types.SimpleNamespace(value="SUCCEEDED")
            def get_job_logs(self, job_id):
                return "the job's log\\n"
            def stop_job(self, job_id):
                return True
            def list_jobs(self):
                return [types.SimpleNamespace(submission_id="raysubmit_1", job_id=None, status=types.SimpleNamespace(value="SUCCEEDED"),
                                              metadata={"shoulders_job": "quickstart"}, start_time=1, entrypoint="shoulders train")]

        ray.job_submission.JobSubmissionClient = Client
        address = ["--address", "http://127.0.0.1:8265"]
        codes = [main(["status", "raysubmit_1", *address]), main(["logs", "raysubmit_1", *address]),
                 main(["stop", "raysubmit_1", *address]), main(["list", *address])]
        heavy = ["torch", "ray.train", "ray.data", "engine.loop.recipe", "engine.models.prepare", "peft", "deepspeed"]
        print(json.dumps({"codes": codes, "loaded": {name: name in sys.modules for name in heavy}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the job's log" in proc.stdout and "quickstart" in proc.stdout, proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0, 0], result
    assert not any(result["loaded"].values()), result["loaded"]
