"""``shoulders tune``: search freeze depth, LR ratios and any other job key with Ray Tune.

Each trial is the base job plus dotted overrides (reproducible with ``shoulders train JOB k=v ...``) and
fits a ``TorchTrainer`` built by :func:`cluster.run.trainer.build_trainer` inside a Tune function trainable
(the Ray Train v2 pattern), which forwards every report to Tune through ``TuneReportCallback``. ASHA
stops the worst trials at rungs counted in optimizer steps, so a trial resumed from its checkpoint keeps
its place. Concurrency is computed from the cluster so trials never wait on each other or on Ray Data.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.ingest.splits import DataInfo
from cluster.run.scratch_twin import validation_rows
from cluster.tune.space import (
    TRIAL_CPUS, base_point, check_space, keep_incumbent, compute_concurrency, model_depth, search_space, step_budget, to_tune_domain,
    override_args, trial_job, tune_metric, tune_mode,
)
from engine.config.schema import JobSpec, build_job, merge, parse_overrides
from engine.errors import JobError

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
RESULTS_FILE = "tune_results.csv"


def trial_spec(base_raw: dict[str, Any], overrides: dict[str, Any], trial_id: str, trials_root: str | os.PathLike) -> JobSpec:
    """The job trial ``trial_id`` runs, with its own name and output folder (its logs; its Train run too, unless
    the search has a ``run.storage_path``: then the run lives in ``run.storage_path``/<job name>/trials/<trial id>)."""
    from engine.checkpoints.storage import join

    name = base_raw.get("name", "job")
    storage_path = (base_raw.get("run") or {}).get("storage_path")
    if storage_path:
        base_raw = merge(base_raw, {"run": {"storage_path": join(storage_path, name, TRIALS_DIR, trial_id)}})
    return trial_job(base_raw, overrides, f"{name}-{trial_id}", os.path.join(trials_root, trial_id))


def experiment_location(job: JobSpec) -> str:
    """Where a search keeps its Tune experiment (``tune/``) and its trials' Train runs: ``run.storage_path``/<job
    name> (a local path or a URI), or ``output.dir``."""
    from engine.checkpoints.storage import join

    return join(job.run.storage_path, job.name) if job.run.storage_path else str(job.output_dir)


def train_history(job: JobSpec) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """A trial's evaluations from its Train run (all of them, also those from before a resume) and the kept
    checkpoint (local path or URI) of each step: the newest complete checkpoint's ``state.json`` holds the full history."""
    from cluster.preflight.output import run_dir_location
    from engine.checkpoints import storage

    run_dir = run_dir_location(job)
    by_step: dict[int, str] = {}
    newest: tuple[int, list[dict[str, Any]]] = (-1, [])
    try:
        folders = [f for f, kind in storage.list_folder(run_dir) if kind == "dir" and storage.name(f).startswith("checkpoint_")]
    except OSError:
        return [], {}
    for folder in folders:
        try:
            train = json.loads(storage.read_text(storage.join(folder, "state.json")))["train"]
        except (OSError, ValueError, KeyError):
            continue
        by_step[int(train["step"])] = folder
        if train["step"] > newest[0]:
            newest = (int(train["step"]), list(train.get("history", [])))
    return newest[1], by_step


# ---------------------------------------------------------------------------------------------------
# The trial and the search


def run_trial(config: dict[str, Any], base_raw: dict[str, Any], info: DataInfo, trials_root: str) -> None:
    """Tune function trainable: build the trial's job and fit its ``TorchTrainer`` (Ray Train v2 pattern).

    The trainer's storage is ``trials_root/<trial id>``, so a restored trial finds its Train run and
    continues from its latest checkpoint.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cluster.run.console import is_verbose, log_dir
    from cluster.ingest.datasets import build_datasets
    from cluster.run.tracking import Tracker
    from cluster.run.trainer import build_trainer
    from engine.tasks import get_task

    from cluster.run.trainer import ensure_ray

    ensure_ray()  # inside the trial: only quiets Ray Data like the driver
    pin_data_to_trial_bundle()
    job = trial_spec(base_raw, config["overrides"], tune.get_context().get_trial_id(), trials_root)
    datasets, num_train_rows = build_datasets(job, info)
    pad_token_id = get_task(job.model.task).preprocessors(job)[1]  # text: the tokenizer's; speech: the CTC blank or none
    tracker = Tracker(job)  # each trial: TensorBoard in its folder, its own MLflow run
    with tracker.running() as tracking:
        trainer = build_trainer(job, info, datasets, num_train_rows, pad_token_id, callbacks=[TuneReportCallback(), *tracking],
                                console=None if is_verbose() else {"queue": None, "log_dir": str(log_dir(job.output_dir))})
        result = trainer.fit()
        if result.error:
            raise result.error
    tracker.close("FINISHED")


DATA_BUNDLE = 1
"""Index of the bundle in each trial's placement group that runs the trial's Ray Data tasks (bundle 0 holds
the trial function itself)."""


def trial_resources(data_cpus: float) -> Any:
    """Each trial's placement group: its function (``TRIAL_CPUS``) and ``data_cpus`` for its Ray Data tasks.

    The trial's TorchTrainer places its workers in a placement group of its own; the data bundle is what
    keeps trials from starving each other's Ray Data. Without it every Ray Data execution on the cluster
    (train and validation streams of every trial, and the requests of stopped trials for up to 180 s) splits
    the CPUs the trainers leave in whole units through Ray Data's cluster-wide autoscaling coordinator:
    with more executions than free CPUs each gets 0 and all of them wait forever ("Cluster resources are
    not enough to run any task from ReadFilesParquetV2"; upstream ray #54305, #38505).
    """
    from ray import tune

    return tune.PlacementGroupFactory([{"CPU": TRIAL_CPUS}, {"CPU": data_cpus}], strategy="PACK")


def pin_data_to_trial_bundle() -> None:
    """Run the Ray Data tasks of datasets built from now on in this trial's data bundle.

    With a placement-group scheduling strategy, Ray Data sizes an execution by the group's bundles instead
    of asking the coordinator for a share of the cluster, so the trial's reads always have their CPU.
    (``DataContext.scheduling_strategy`` is deprecated for after January 2027; Ray 2.60 still honours it.)
    """
    import warnings

    import ray.data
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = get_current_placement_group()
    if group is None or len(group.bundle_specs) <= DATA_BUNDLE:
        return
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=DATA_BUNDLE)
    ctx = ray.data.DataContext.get_current()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx.scheduling_strategy = strategy
        ctx.scheduling_strategy_large_args = strategy


@dataclass
class TuneOutcome:
    """What a finished search produced."""

    out_dir: Path
    trials: list[dict[str, Any]]
    """One row per trial (see :func:`trial_rows`), best first."""
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Trial id -> its reported metrics, in order."""
    best_job: JobSpec | None = None
    best_checkpoint: str | None = None
    note: str | None = None
    """Why the chosen trial (the first row) is not the highest-scoring one, when it is not."""
    validation_rows: int | None = None
    """Rows the trials were ranked on (the noise of their comparisons)."""


def build_tuner(job: JobSpec, info: DataInfo, base_raw: dict[str, Any], resume: bool) -> Any:
    """The ``Tuner`` of a search (or the one restored from ``output.dir/tune`` with ``resume``)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from cluster.run.trainer import use_gpu
    from cluster.tune.trial_table import TrialTable, tune_verbosity

    out = job.output_dir
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_raw=base_raw, info=info, trials_root=str(out / TRIALS_DIR)),
        trial_resources(job.tune.data_cpus),
    )
    from engine.checkpoints.storage import join

    if resume:
        path = join(experiment_location(job), TUNE_DIR)
        if not tune.Tuner.can_restore(path):
            raise JobError(f"--resume: '{path}' holds no search to continue; run shoulders tune without --resume.")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)

    resources = ray.cluster_resources()
    concurrency = compute_concurrency(
        resources.get("CPU", 0), resources.get("GPU", 0), job.scaling.num_workers, job.scaling.cpus_per_worker,
        use_gpu(job), job.tune.data_cpus, TRIAL_CPUS, job.tune.max_concurrent_trials,
    )
    eval_every, total_steps = step_budget(job, info.splits["train"].num_rows)
    if job.tune.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="step", max_t=total_steps, grace_period=min(job.tune.grace_period * eval_every, total_steps),
            reduction_factor=job.tune.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    space = search_space(job)
    first = _base_point_or_none(job)
    log.info("tune: %d samples over %s, %d trial(s) at once, scheduler %s%s", job.tune.num_samples, list(space), concurrency,
             job.tune.scheduler, f", first the job's own values {first}" if first else "")
    return tune.Tuner(
        trainable,
        param_space={"overrides": {key: to_tune_domain(*next(iter(d.items()))) for key, d in space.items()}},
        tune_config=tune.TuneConfig(
            metric=tune_metric(job), mode=tune_mode(job), num_samples=job.tune.num_samples, scheduler=scheduler,
            search_alg=BasicVariantGenerator(
                points_to_evaluate=[{"overrides": first}] if first else None, random_state=job.seed, max_concurrent=concurrency,
            ),
        ),
        run_config=tune.RunConfig(  # a growing table of trials on the console, Tune's status boxes with --verbose
            name=TUNE_DIR, storage_path=experiment_location(job), verbose=tune_verbosity(),
            callbacks=[TrialTable(tune_metric(job), tune_mode(job), total_steps)],
        ),
    )


def run_search(job: JobSpec, info: DataInfo, base_raw: dict[str, Any], resume: bool = False) -> TuneOutcome:
    """Run (or continue) the search and collect one row per trial."""
    from cluster.run.shared_disk import check_shared_locations, search_write_locations
    from cluster.run.trainer import ensure_ray

    ensure_ray()
    check_shared_locations(search_write_locations(job, experiment_location(job)))  # several nodes: all must see it
    grid = build_tuner(job, info, base_raw, resume).fit()
    return collect(job, info, base_raw, grid)


def collect(job: JobSpec, info: DataInfo, base_raw: dict[str, Any], grid: Any) -> TuneOutcome:
    """Rows, histories and the best trial of a finished ``ResultGrid``."""
    metric, mode = tune_metric(job), tune_mode(job)
    rows, histories = [], {}
    for result in grid:
        overrides = dict((result.config or {}).get("overrides", {}))
        trial_id = str((result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path))
        frame = result.metrics_dataframe
        history = frame.to_dict("records") if frame is not None and len(frame) else []
        # Tune forgets a restored trial's reports from before the restart; its Train run remembers them.
        from_train, checkpoints = train_history(trial_spec(base_raw, overrides, trial_id, job.output_dir / TRIALS_DIR))
        if len(from_train) > len(history) or (from_train and job.run.storage_path):  # checkpoints where the runs keep them
            history = [{**h, "checkpoint_path": checkpoints.get(int(h.get("step", -1)))} for h in from_train]
        histories[trial_id] = history
        rows.append(trial_row(trial_id, overrides, history, metric, mode, trial_job(base_raw, overrides), info, result.error))
    sign = 1 if mode == "max" else -1
    rows.sort(key=lambda r: -sign * r["best"] if r["best"] is not None else math.inf)
    rows, note = keep_incumbent(rows, _base_point_or_none(job), mode, validation_rows(job, info))
    outcome = TuneOutcome(out_dir=job.output_dir, trials=rows, histories=histories, note=note, validation_rows=validation_rows(job, info))
    if rows and rows[0]["best"] is not None:
        best = rows[0]
        outcome.best_job = trial_job(base_raw, best["overrides"])
        outcome.best_checkpoint = best["best_checkpoint"]
    return outcome


def _base_point_or_none(job: JobSpec) -> dict[str, Any] | None:
    """The base job's own point of the space when ``tune.include_base`` ran it as a trial."""
    if not job.tune.include_base:
        return None
    try:
        depth = _depth_or_none(job)
    except JobError:  # no readable model config and no explicit space: nothing was searched from it
        return None
    return base_point(job, search_space(job, depth) if depth is not None else dict(job.tune.space), depth)


def _trial_id_from_path(path: str | None) -> str:
    import re

    found = re.search(r"run_trial_([0-9a-f]+_\d+)", path or "")
    return found.group(1) if found else "?"


def trial_row(
    trial_id: str, overrides: dict[str, Any], history: list[dict[str, Any]], metric: str, mode: str,
    job: JobSpec, info: DataInfo, error: Any = None,
) -> dict[str, Any]:
    """One trial's line of ``tune_results.csv``: overrides, final and best metric, evaluations, whether the
    scheduler stopped it before its planned steps."""
    _, planned = step_budget(job, info.splits["train"].num_rows)
    scored = [h for h in history if h.get(metric) is not None]
    best = (max if mode == "max" else min)(scored, key=lambda h: h[metric]) if scored else None
    last = history[-1] if history else {}
    patience = job.eval.early_stopping_patience
    stopped_by_patience = bool(patience and len(scored) > patience and best is not None
                               and all(h is not best for h in scored[-patience:]))
    last_step = int(last.get("step", 0) or 0)
    return {
        "trial_id": trial_id,
        "overrides": overrides,
        "command": " ".join(override_args(overrides)),
        "final": last.get(metric),
        "best": best[metric] if best else None,
        "best_step": best.get("step") if best else None,
        "best_checkpoint": best.get("checkpoint_path") if best else None,
        "iterations": len(history),
        "last_step": last_step,
        "planned_steps": planned,
        "stopped_early": bool(history) and error is None and last_step < planned and not stopped_by_patience
        and last.get("stop_reason") is None,
        "forgetting": last.get("forgetting"),  # on safeguards.retention_data
        "drift": last.get("drift"),  # on the target's own rows (beside forgetting when there is retention data)
        "train_val_gap": last.get("train_val_gap"),
        "freeze_depth": job.finetune.freeze_depth or 0,  # as the trial ran (presets filled): for the report
        "peft_method": job.peft.method,
        "backbone_lr_ratio": job.finetune.backbone_lr_ratio,
        "error": str(error).splitlines()[0][:200] if error else None,
    }


# ---------------------------------------------------------------------------------------------------
# The command: checks, search, test of the best trial, scratch baseline, report


def check_tune_output(job: JobSpec, resume: bool) -> None:
    """Refuse to start a new search over an existing one (``--resume`` continues it)."""
    from engine.checkpoints.storage import exists, join

    out = job.output_dir
    if not resume and (exists(join(experiment_location(job), TUNE_DIR)) or (out / RESULTS_FILE).exists()):
        raise JobError(
            f"output.dir '{out}' already holds a search. Continue it with --resume, or choose another output.dir or name."
        )


def check_search(job: JobSpec, raw: dict[str, Any], resume: bool = False) -> tuple[dict[str, Any], int | None]:
    """The checks ``tune`` adds to the train preflight (``job`` has passed it): each trial fits the cluster, no
    search is overwritten, the space is valid. Returns the base job of the trials and the model's depth."""
    from cluster.preflight.job import with_absolute_paths
    from cluster.preflight.output import check_resources

    job = with_absolute_paths(job)
    check_resources(job, extra_cpus=job.tune.data_cpus, what="each trial")
    check_tune_output(job, resume)
    base_raw = merge(raw, {"model": {"name": job.model.name}, "output": {"dir": str(job.output_dir)}})
    depth = _depth_or_none(job)
    check_space(base_raw, search_space(job, depth) if depth is not None else dict(job.tune.space))
    return base_raw, depth


def validate_search(job_path: str, overrides: list[str], resume: bool = False) -> tuple[JobSpec, DataInfo]:
    """Every check ``shoulders tune`` makes before Ray starts (``shoulders validate --tune``); writes nothing."""
    from cluster.preflight.job import preflight_checks
    from engine.config.schema import read_job_file

    raw = merge(read_job_file(job_path), parse_overrides(overrides))
    job = build_job(raw, job_path)
    info = preflight_checks(job)
    check_search(job, raw, resume)
    return job, info


def run_tune(job_path: str, overrides: list[str], resume: bool = False) -> TuneOutcome:
    """``shoulders tune``: validate, search, test the best trial, compare with scratch, write the report."""
    import time

    from cluster.run.interrupts import Interrupted, watch_interrupts
    from cluster.preflight.job import preflight
    from engine.config.schema import read_job_file

    started = time.perf_counter()
    raw = merge(read_job_file(job_path), parse_overrides(overrides))
    job, info = preflight(build_job(raw, job_path))
    base_raw, depth = check_search(job, raw, resume)
    job.output_dir.mkdir(parents=True, exist_ok=True)
    from cluster.run.start import start_run

    start_run(job, info)  # logs into output.dir/logs, Ray started, the header printed
    with watch_interrupts() as interrupted:
        outcome = run_search(job, info, base_raw, resume)
    if interrupted():  # Tune stopped the search on Ctrl-C: report what finished, untested, then exit 130
        write_outputs(job, outcome, depth, None, None, time.perf_counter() - started, job_path)
        raise Interrupted()
    test, verdict = None, None
    if outcome.best_job is not None and outcome.best_checkpoint:
        test = evaluate_best(outcome, info, job.results_location)
        verdict = scratch_verdict(outcome.best_job, info, test, job.output_dir / "scratch", job.safeguards.compare_scratch)
    write_outputs(job, outcome, depth, test, verdict, time.perf_counter() - started, job_path)
    return outcome


def _depth_or_none(job: JobSpec) -> int | None:
    try:
        return model_depth(job)
    except JobError:
        if not job.tune.space:
            raise
        return None


def evaluate_best(outcome: TuneOutcome, info: DataInfo, results: str) -> dict[str, float] | None:
    """Export the best trial's best checkpoint (local or in object storage) to ``results``/model and evaluate it on
    the test split, both in a Ray task with a training worker's resources (:mod:`cluster.run.export_task`)."""
    import ray.train

    from cluster.run.export_task import export_and_test
    from cluster.run.trainer import EXPORT_DIR, use_gpu
    from engine.checkpoints import storage

    filesystem, path = storage.resolve(outcome.best_checkpoint)
    checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
    test = export_and_test(outcome.best_job, info, checkpoint, storage.join(results, EXPORT_DIR), use_gpu(outcome.best_job))
    if test is not None:
        log.info("best trial on test: %s", test)
    return test


def scratch_verdict(best_job: JobSpec, info: DataInfo, test: dict[str, float] | None, out_dir: Path, compare: bool) -> Any:
    """The best trial's verdict on test: against chance and the majority class, and (``compare``) against
    its fair scratch twin trained in ``out_dir``. A pair (verdict, scratch LR search), or None."""
    from cluster.run.scratch_twin import judge_run, train_scratch_twin, write_verdict

    if not test:
        return None
    scratch, search = train_scratch_twin(best_job, info, out_dir) if compare else (None, None)
    verdict = judge_run(best_job, info, test, None, scratch, search)
    if verdict is None:
        return None
    write_verdict(out_dir.parent, verdict, search)
    return verdict, search


def write_outputs(job: JobSpec, outcome: TuneOutcome, depth: int | None, test: dict[str, float] | None, verdict: Any,
                  elapsed_s: float, job_path: str = "JOB.yaml") -> None:
    """tune_results.csv, best_job.yaml, the plots and report.md; then the ranked table on the terminal."""
    from cluster.tune.report import plot_results, print_ranked, write_best_job, write_report, write_results_csv

    out = job.output_dir
    write_results_csv(out / RESULTS_FILE, outcome.trials)
    if outcome.best_job is not None:
        write_best_job(out / "best_job.yaml", outcome.best_job, out)
    baselines = verdict[0].baselines if verdict is not None else None  # chance line on accuracy plots
    chance = baselines.best if baselines is not None and tune_metric(job) == "val_accuracy" else None
    plots = plot_results(out, outcome.trials, outcome.histories, tune_metric(job), depth, chance, tune_mode(job))
    report = write_report(out, job, outcome, depth, test, verdict, plots, elapsed_s, job_path)
    print_ranked(outcome.trials, tune_metric(job))
    if outcome.note:
        print(outcome.note)
    if verdict is not None:
        from cluster.run.scratch_twin import print_verdict

        print_verdict(*verdict)
    from cluster.run.trainer import copy_results

    copy_results(job, (RESULTS_FILE, "best_job.yaml", "report.md", "transfer.json"))  # to output.uri, when set
    print(f"results: {out / RESULTS_FILE}\nbest job: {out / 'best_job.yaml'}\nreport: {report}")
