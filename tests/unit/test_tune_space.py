"""Pure pieces of ``shoulders tune``: the search space, trial jobs, concurrency, the results file and report."""

from __future__ import annotations

import math

import pytest

from cluster.tune import search as tune
from cluster.tune import space as shtune
from cluster.tune import report as tune_report
from engine.config.schema import build_job, load_job
from engine.errors import JobError


def base_raw(tmp_path, **extra):
    return {
        "name": "t",
        "model": {"name": "some/model", "labels": ["a", "b"]},
        "data": {"train": "train.parquet"},
        "finetune": {"strategy": "full", "head_lr": 1e-3},
        "output": {"dir": str(tmp_path / "out")},
        **extra,
    }


def test_default_space_covers_freeze_depth_lr_ratio_head_lr_and_strategy(tmp_path):
    job = build_job(base_raw(tmp_path))
    space = shtune.search_space(job, depth=6)
    assert space["finetune.freeze_depth"] == {"randint": [0, 6]}
    assert space["finetune.backbone_lr_ratio"] == {"loguniform": [0.01, 1.0]}
    low, high = space["finetune.head_lr"]["loguniform"]
    assert math.isclose(low, 1e-3 / 3) and math.isclose(high, 3e-3)
    assert set(space["finetune.strategy"]["choice"]) == {"full", "lora"}


def test_job_space_replaces_the_default(tmp_path):
    job = build_job(base_raw(tmp_path, tune={"space": {"optim.batch_size": {"grid": [8, 16]}}}))
    assert shtune.search_space(job, depth=6) == {"optim.batch_size": {"grid": [8, 16]}}


def test_domains_become_tune_domains_with_inclusive_randint():
    from ray.tune.search.sample import Categorical, Float, Integer

    randint = shtune.to_tune_domain("randint", [0, 6])
    assert isinstance(randint, Integer) and (randint.lower, randint.upper) == (0, 7)
    assert {randint.sample() for _ in range(400)} == set(range(7))
    assert isinstance(shtune.to_tune_domain("loguniform", [0.01, 1]), Float)
    assert isinstance(shtune.to_tune_domain("choice", ["full", "lora"]), Categorical)
    assert shtune.to_tune_domain("grid", [1, 2]) == {"grid_search": [1, 2]}


def test_trial_job_is_base_plus_overrides_and_reproducible_from_the_command_line(tmp_path):
    raw = base_raw(tmp_path)
    overrides = {"finetune.freeze_depth": 3, "finetune.backbone_lr_ratio": 0.0345, "finetune.strategy": "lora"}
    job = shtune.trial_job(raw, overrides)
    assert job.finetune.freeze_depth == 3 and job.finetune.backbone_lr_ratio == 0.0345
    assert job.peft.method == "lora"  # the preset of the sampled strategy applies
    args = shtune.override_args(overrides)
    assert args == ["finetune.backbone_lr_ratio=0.0345", "finetune.freeze_depth=3", "finetune.strategy=lora"]
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_job(path, args) == job  # `shoulders train job.yaml <args>` runs exactly the trial


def test_bad_space_is_refused_before_ray_naming_the_key(tmp_path):
    raw = base_raw(tmp_path)
    with pytest.raises(JobError, match="tune.space.finetune.freez_depth"):
        shtune.check_space(raw, {"finetune.freez_depth": {"choice": [1]}})
    with pytest.raises(JobError, match="tune.space.optim.batch_size"):
        shtune.check_space(raw, {"optim.batch_size": {"choice": [0]}})
    with pytest.raises(JobError, match="output"):
        shtune.check_space(raw, {"output.dir": {"choice": ["x"]}})
    shtune.check_space(raw, {"finetune.freeze_depth": {"randint": [0, 6]}})


@pytest.mark.parametrize(
    "domain, message",
    [({"uniform": [1.0]}, "low, high"), ({"loguniform": [0, 1]}, "low > 0"), ({"choice": [], }, "at least one"),
     ({"uniform": [2, 1]}, "low < high"), ({"choice": [1], "grid": [2]}, "exactly one")],
)
def test_schema_checks_each_domain(tmp_path, domain, message):
    with pytest.raises(JobError, match=message):
        build_job(base_raw(tmp_path, tune={"space": {"finetune.head_lr": domain}}))


@pytest.mark.parametrize(
    "cpus, gpus, workers, cpw, gpu, expected",
    [
        (2, 0, 2, 0.45, False, 1),  # this machine: one 2-worker trial, one whole CPU left to its Ray Data
        (2, 0, 1, 0.45, False, 1),  # a second trial's pipelines would starve (seen: ReadFiles never scheduled)
        (4, 0, 1, 0.45, False, 2),  # the test session's 4 logical CPUs
        (16, 0, 2, 1.0, False, 5),
        (64, 8, 2, 4.0, True, 4),   # GPUs bound it
        (64, 8, 1, 4.0, True, 8),
    ],
)
def test_concurrency_leaves_each_trial_a_whole_cpu_for_ray_data(cpus, gpus, workers, cpw, gpu, expected):
    n = shtune.compute_concurrency(cpus, gpus, workers, cpw, gpu)
    assert n == expected
    assert cpus - n * (shtune.TRIAL_CPUS + workers * cpw) >= n * 1.0
    assert shtune.compute_concurrency(cpus, gpus, workers, cpw, gpu, requested=1) == 1


def test_concurrency_refuses_a_trial_that_cannot_fit():
    # the plain quickstart's 2 workers x 0.5 CPU fill a 2-CPU machine once a trial's own 0.01 CPU is added
    with pytest.raises(JobError, match="scaling.cpus_per_worker"):
        shtune.compute_concurrency(2, 0, 2, 0.5, False)
    with pytest.raises(JobError, match="2 GPUs"):
        shtune.compute_concurrency(64, 1, 2, 1.0, True)


def row(trial, overrides, best, stopped, forgetting=0.1):
    return {"trial_id": trial, "overrides": overrides, "command": " ".join(shtune.override_args(overrides)), "final": best,
            "best": best, "best_step": 10, "best_checkpoint": None, "iterations": 2 if stopped else 6, "last_step": 10,
            "planned_steps": 30, "stopped_early": stopped, "forgetting": forgetting, "train_val_gap": 0.2, "error": None}


def test_results_file_best_job_plots_and_report(tmp_path):
    raw = base_raw(tmp_path)
    rows = [
        row("a1", {"finetune.freeze_depth": 2, "finetune.backbone_lr_ratio": 0.1}, 0.8, False),
        row("b2", {"finetune.freeze_depth": 6, "finetune.backbone_lr_ratio": 0.02}, 0.5, True),
    ]
    histories = {"a1": [{"step": 5, "val_accuracy": 0.6}, {"step": 10, "val_accuracy": 0.8}], "b2": [{"step": 5, "val_accuracy": 0.5}]}
    job = build_job(raw)
    best_job = shtune.trial_job(raw, rows[0]["overrides"])
    outcome = tune.TuneOutcome(out_dir=tmp_path, trials=rows, histories=histories, best_job=best_job)
    tune_report.write_results_csv(tmp_path / "tune_results.csv", rows)
    read = tune_report.read_results_csv(tmp_path / "tune_results.csv")
    assert [r["trial_id"] for r in read] == ["a1", "b2"]
    assert read[1]["finetune.freeze_depth"] == "6" and read[1]["stopped_early"] == "True"
    path = tune_report.write_best_job(tmp_path / "best_job.yaml", best_job, tmp_path)
    again = load_job(path)
    assert again.finetune.freeze_depth == 2 and again.output_dir == tmp_path / "best"
    plots = tune_report.plot_results(tmp_path, rows, histories, "val_accuracy", depth=6)
    assert {p.name for p in plots} == {"metric_vs_freeze_depth.png", "metric_vs_lr_ratio.png", "learning_curves.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots)
    from engine.safeguards.guards import transfer_verdict

    verdict = transfer_verdict("accuracy", 0.4, 0.55, "max", 300)  # se 0.0403, margin 0.0807 < 0.15
    report = tune_report.write_report(tmp_path, job, outcome, 6, {"accuracy": 0.4}, (verdict, None), plots).read_text()
    assert "light fine-tuning" in report and "2 of 6 blocks frozen" in report
    assert "stopped 1 of them early" in report and "**transfer verdict: negative transfer**" in report and "learning_curves.png" in report
    assert "gain of pre-trained over scratch -0.1500; standard error 0.0403" in report


@pytest.mark.parametrize(
    "n_frozen, method, name",
    [(6, "none", "feature extraction"), (0, "none", "full fine-tuning"), (4, "none", "light fine-tuning"), (0, "lora", "parameter-efficient fine-tuning")],
)
def test_recommendation_terms(n_frozen, method, name):
    assert tune_report.recommendation(n_frozen, 6, method)[0] == name


def test_quickstart_tune_job_searches_valid_keys_one_trial_at_a_time_on_two_cores():
    from pathlib import Path

    from engine.config.schema import read_job_file

    path = Path(__file__).parents[2] / "jobs" / "quickstart_tune.yaml"
    job = load_job(path)
    shtune.check_space(read_job_file(path), shtune.search_space(job, depth=6))
    assert set(job.tune.space) >= {"finetune.freeze_depth", "finetune.backbone_lr_ratio"}
    n = shtune.compute_concurrency(2, 0, job.scaling.num_workers, job.scaling.cpus_per_worker, False, job.tune.data_cpus)
    assert n == 1
    assert job.tune.scheduler == "asha" and job.optim.epochs == load_job(path.with_name("quickstart.yaml")).optim.epochs
    assert job.safeguards.compare_scratch  # the shipped search measures the gain over scratch


def test_collect_takes_a_restored_trials_full_history_from_its_train_run(tmp_path):
    """Tune forgets the reports a restored trial made before the restart; the rows use the Train run's history."""
    import json

    import pandas as pd

    from cluster.ingest.splits import DataInfo, SplitInfo

    raw = base_raw(tmp_path, optim={"epochs": 3, "batch_size": 10}, scaling={"num_workers": 1})
    job = build_job(raw)
    evals = [{"step": s, "val_accuracy": a, "forgetting": f} for s, a, f in ((10, 0.9, 0.1), (20, 0.6, 0.2), (30, 0.7, 0.3))]
    run = tmp_path / "out" / "trials" / "abc_00001" / "train"
    for i, ev in enumerate(evals):
        folder = run / f"checkpoint_{i}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"train": {"step": ev["step"], "history": evals[: i + 1]}}))

    class Result:  # what a ResultGrid yields for the restored trial: only the reports after the restart
        config = {"overrides": {"finetune.backbone_lr_ratio": 0.5}}
        metrics = {"trial_id": "abc_00001"}
        path = "/x/run_trial_abc_00001_1_finetune"
        error = None
        metrics_dataframe = pd.DataFrame([{**e, "trial_id": "abc_00001"} for e in evals[1:]])

    info = DataInfo(splits={"train": SplitInfo("train", ["train.parquet"], "parquet", 100)}, labels=["a", "b"])
    outcome = tune.collect(job, info, raw, [Result()])
    (row,) = outcome.trials
    assert row["iterations"] == 3 and row["best"] == 0.9 and row["best_step"] == 10
    assert row["best_checkpoint"] == str(run / "checkpoint_0") and row["last_step"] == 30 == row["planned_steps"]
    assert not row["stopped_early"] and row["forgetting"] == 0.3
    assert outcome.best_job.finetune.backbone_lr_ratio == 0.5 and outcome.best_checkpoint == row["best_checkpoint"]
    assert tune._trial_id_from_path(Result.path) == "abc_00001"


def test_base_point_is_the_jobs_own_values_when_inside_the_space(tmp_path):
    job = build_job(base_raw(tmp_path, finetune={"strategy": "full", "head_lr": 1e-3, "backbone_lr_ratio": 0.1}))
    space = {
        "finetune.freeze_depth": {"randint": [0, 6]},
        "finetune.backbone_lr_ratio": {"loguniform": [0.03, 1.0]},
        "finetune.head_lr": {"loguniform": [5e-4, 3e-3]},
        "finetune.strategy": {"choice": ["full", "lora"]},
    }
    # freeze_depth left empty freezes no block: the point says 0, a value `shoulders train` accepts
    assert shtune.base_point(job, space, depth=6) == {
        "finetune.freeze_depth": 0, "finetune.backbone_lr_ratio": 0.1, "finetune.head_lr": 1e-3, "finetune.strategy": "full",
    }
    shtune.trial_job(base_raw(tmp_path), shtune.base_point(job, space, depth=6))
    # any key outside its domain (or a grid) drops the point: the search samples every trial
    assert shtune.base_point(job, {**space, "finetune.head_lr": {"loguniform": [2e-3, 3e-3]}}, depth=6) is None
    assert shtune.base_point(job, {**space, "finetune.strategy": {"choice": ["lora"]}}, depth=6) is None
    assert shtune.base_point(job, {"optim.batch_size": {"grid": [8, 16]}}, depth=6) is None
    assert shtune.base_point(job, {"optim.no_such_key": {"choice": [1]}}, depth=6) is None


def test_the_jobs_own_trial_is_kept_unless_beaten_beyond_validation_noise():
    base = {"finetune.freeze_depth": 0, "finetune.backbone_lr_ratio": 0.1}
    lucky = row("t1", {"finetune.freeze_depth": 0, "finetune.backbone_lr_ratio": 0.14}, 0.797, False)
    own = row("t0", dict(base), 0.757, False)
    rows = [lucky, own, row("t2", {"finetune.freeze_depth": 6, "finetune.backbone_lr_ratio": 0.05}, 0.30, True)]
    # 3 rows of 75 ahead (0.04) is within one standard error of the difference (~0.068): keep the job's own
    kept, note = shtune.keep_incumbent(rows, base, "max", 75)
    assert [r["trial_id"] for r in kept] == ["t0", "t1", "t2"]
    assert "kept the job's own values (trial t0)" in note and "t1 is ahead by 0.0400" in note and "75 validation rows" in note
    # on 3,000 validation rows the same lead is real (noise ~0.011): the best trial stays first
    assert shtune.keep_incumbent(rows, base, "max", 3000) == (rows, None)
    # a clear lead, a metric better lower, no base trial, or the base already first: nothing changes
    clear = [row("t1", lucky["overrides"], 0.90, False), own]
    assert shtune.keep_incumbent(clear, base, "max", 75) == (clear, None)
    assert shtune.keep_incumbent(rows, base, "min", 75) == (rows, None)
    assert shtune.keep_incumbent(rows, {"finetune.freeze_depth": 3}, "max", 75) == (rows, None)
    assert shtune.keep_incumbent([own, lucky], base, "max", 75) == ([own, lucky], None)


def test_each_trial_reserves_a_cpu_bundle_for_its_ray_data():
    factory = tune.trial_resources(1.5)
    assert factory.bundles == [{"CPU": shtune.TRIAL_CPUS}, {"CPU": 1.5}]
    assert tune.DATA_BUNDLE == 1
    with pytest.raises(JobError, match="tune.data_cpus"):
        build_job({"model": {"name": "m"}, "data": {"train": "t.parquet"}, "tune": {"data_cpus": 0.5}})
