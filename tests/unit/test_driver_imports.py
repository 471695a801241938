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
        from cluster.cli import main
        from cluster import cli_remote, submit
        assert main(["validate", {str(job)!r}]) == 0
        submit.prepare_submission({str(job)!r})
        heavy = ["torch", "ray.train", "ray.data", "engine.loop.recipe", "engine.models.prepare", "peft", "deepspeed"]
        print(json.dumps({{name: name in sys.modules for name in heavy}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(loaded.values()), loaded
