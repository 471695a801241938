"""The job schema: unknown keys named with the nearest valid one, types, presets, overrides, fast CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.config.schema import JobSpec, build_job, field_docs, job_to_yaml, load_job, parse_overrides, plan_steps
from engine.errors import JobError

MINIMAL = {"model": {"name": "org/model"}, "data": {"train": "train.parquet"}}


def write_job(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_misspelled_key_names_the_key_and_the_nearest_valid_one():
    with pytest.raises(JobError) as err:
        build_job({**MINIMAL, "optim": {"learning_rate": 1e-3, "batchsize": 8}})
    message = str(err.value)
    assert "unknown key 'optim.batchsize'" in message and "Did you mean 'optim.batch_size'?" in message
    assert "unknown key 'optim.learning_rate'" in message


def test_misspelled_section_is_named():
    with pytest.raises(JobError, match=r"unknown key 'finetun'. Did you mean 'finetune'\?"):
        build_job({**MINIMAL, "finetun": {"freeze_depth": 2}})


def test_wrong_type_and_missing_key_are_named():
    with pytest.raises(JobError, match=r"'optim.batch_size': .*integer"):
        build_job({**MINIMAL, "optim": {"batch_size": "eight"}})
    with pytest.raises(JobError, match="missing required key 'data'"):
        build_job({"model": {"name": "x"}})
    with pytest.raises(JobError, match="'finetune.backbone_lr_ratio'"):
        build_job({**MINIMAL, "finetune": {"backbone_lr_ratio": -1}})


def test_cross_field_checks():
    with pytest.raises(JobError, match="peft.method is 'none'"):
        build_job({**MINIMAL, "output": {"export": "adapter"}})
    with pytest.raises(JobError, match="duplicates"):
        build_job({**MINIMAL, "model": {"name": "x", "labels": ["a", "a"]}})


def test_overrides_are_typed_by_the_schema(tmp_path):
    path = write_job(tmp_path, MINIMAL)
    job = load_job(path, ["optim.batch_size=8", "finetune.freeze_depth=all", "peft.target_modules=[query, value]", "finetune.head_lr=3e-4"])
    assert job.optim.batch_size == 8 and job.finetune.freeze_depth == "all"
    assert job.peft.target_modules == ["query", "value"] and job.finetune.head_lr == pytest.approx(3e-4)
    with pytest.raises(JobError, match="unknown key 'optim.batchsize'"):
        load_job(path, ["optim.batchsize=8"])
    with pytest.raises(JobError, match="key=value"):
        parse_overrides(["optim.batch_size"])


def test_strategy_presets_fill_only_unset_fields():
    job = build_job({**MINIMAL, "finetune": {"strategy": "lora"}})
    assert job.peft.method == "lora" and job.finetune.freeze_depth == 0
    job = build_job({**MINIMAL, "finetune": {"strategy": "lora", "freeze_depth": 3}, "peft": {"method": "dora"}})
    assert job.peft.method == "dora" and job.finetune.freeze_depth == 3
    assert build_job({**MINIMAL, "finetune": {"strategy": "feature_extraction"}}).finetune.freeze_depth == "all"


def test_derived_metric_and_mode():
    assert build_job(MINIMAL).eval_metric == "accuracy" and build_job(MINIMAL).eval_mode == "max"
    lm = build_job({"model": {"name": "x", "task": "causal_lm"}, "data": {"train": "t.jsonl"}})
    assert lm.eval_metric == "loss" and lm.eval_mode == "min"


def test_written_job_round_trips():
    job = build_job({**MINIMAL, "finetune": {"strategy": "light"}})
    assert JobSpec.model_validate(yaml.safe_load(job_to_yaml(job))) == job


def test_every_field_has_a_docstring():
    undocumented = [key for key, _, doc in field_docs() if not doc.strip()]
    assert undocumented == []


def test_missing_job_file_and_bad_yaml(tmp_path):
    with pytest.raises(JobError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(JobError, match="not valid YAML"):
        load_job(bad)


def test_validate_cli_exits_2_fast_without_importing_torch(tmp_path):
    path = write_job(tmp_path, {**MINIMAL, "optim": {"batchsize": 8}})
    code = (
        "import sys; from cluster.cli.main import main; rc = main(['validate', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'validate imported torch'; sys.exit(rc)"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "optim.batchsize" in proc.stderr and "optim.batch_size" in proc.stderr
    assert elapsed < 2.0, f"validate took {elapsed:.2f}s"


def test_overrides_may_follow_the_options():
    from cluster.cli.main import build_parser, parse_args

    args = parse_args(build_parser(), ["train", "job.yaml", "optim.epochs=2", "--compare-scratch", "output.dir=/tmp/x"])
    assert args.compare_scratch and args.overrides == ["optim.epochs=2", "output.dir=/tmp/x"]
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["train", "job.yaml", "--no-such-flag"])


def test_plan_steps_counts_optimizer_steps_per_worker_shard():
    def plan(optim: dict, rows: int, workers: int) -> tuple[int, int]:
        return plan_steps(build_job({**MINIMAL, "optim": optim}), rows, workers)

    assert plan({"batch_size": 16, "epochs": 3}, 240, 1) == (15, 45)
    assert plan({"batch_size": 16, "epochs": 3}, 240, 2) == (8, 24)  # 120 rows a worker: 8 micro-batches, the last short
    assert plan({"batch_size": 16, "epochs": 3, "grad_accum": 2}, 240, 2) == (4, 12)
    assert plan({"batch_size": 16, "epochs": 0.5}, 240, 1) == (15, 8)
    assert plan({"batch_size": 16, "max_steps": 7}, 240, 1) == (15, 7)
    assert plan({"batch_size": 64, "epochs": 1}, 3, 4) == (1, 1)  # fewer rows than workers: one step, not zero
