"""Golden runs: every task trained a few steps through preflight, ingest and the worker loop (no Ray)
reports the losses, task metrics and learning rates recorded in ``tests/golden/golden.json``.

The recorded numbers are written by ``tests/golden_run.py --write``; a refactor that moves any of them
changes behaviour.
"""

from __future__ import annotations

import json

import pytest

import golden_run

GOLDEN = json.loads(golden_run.GOLDEN.read_text())


@pytest.fixture(scope="module")
def golden_cases(tmp_path_factory) -> dict:
    return golden_run.cases(golden_run.build_assets(tmp_path_factory.mktemp("golden-assets")))


def test_every_task_has_a_golden_run(golden_cases):
    from engine.tasks import DEFAULT_TASK, TASK_MODULES

    tasks = {job["model"].get("task", DEFAULT_TASK) for job in golden_cases.values()}
    assert tasks == set(TASK_MODULES) and set(golden_cases) == set(GOLDEN)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_run_reports_the_recorded_numbers(name, golden_cases, tmp_path):
    reported = golden_run.run_golden(golden_cases[name], tmp_path)
    expected = GOLDEN[name]
    assert [sorted(m) for m in reported] == [sorted(m) for m in expected], "the reported metric names changed"
    for got, want in zip(reported, expected):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{name} step {want['step']:.0f}: {key}"
