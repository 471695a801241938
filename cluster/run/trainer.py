"""Building and running the Ray Train ``TorchTrainer`` for a job, then exporting and testing the best model."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from cluster.ingest.datasets import build_datasets, build_eval_dataset
from cluster.ingest.text import generation_samples
from cluster.run.interrupts import watch_interrupts
from cluster.ingest.splits import DataInfo
from cluster.preflight.output import check_resources
from engine.config.schema import JobSpec
from engine.errors import JobError

log = logging.getLogger(__name__)
TRAIN_DIR = "train"
EXPORT_DIR = "model"
CONTROLLER_RETRIES = 4
"""Times Ray Train may retry starting a worker group (each try waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``,
60 s by default) before the run fails; Ray's own default is without limit."""


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at ``address`` / ``RAY_ADDRESS``, or start an embedded local Ray.

    The embedded Ray runs its dashboard: Ray Train v2 frees the worker placement group of a controller
    that died (a Tune trial stopped by ASHA, or one that just finished) through a cleaner actor that asks
    the dashboard's state API; without it the groups leaked, each holding its workers' CPUs until the
    driver exited, and on 2 cores the next trial's workers waited forever for theirs.
    """
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    from cluster.run.console import ray_init_kwargs  # worker output on the console only with --verbose
    from cluster.remote.local_cluster import secure_embedded_token

    if address:
        ray.init(address=address, **ray_init_kwargs())
    else:
        secure_embedded_token()  # the token file Ray would write readable by all: mode 600
        start_embedded_ray(**ray_init_kwargs())


EMBEDDED_TRAIN_ENV = {
    # Nothing preempts a machine's own Ray: its watcher is one more Python process per run (seconds of start-up
    # on a laptop's CPUs, for every train and every tune trial).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train's controller polls its workers this often (default 2 s): a short run ends up to a poll later.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
    # Ray Data reads each parquet split's footers with a pool of 32 actors by default (sized for clusters and
    # thousands of files): on one machine that asked for 96 worker processes per run, most started only to
    # sit idle, over a minute of CPU for a run of seconds. One actor reads a laptop's footers (128 threads).
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    # The raylet starts a worker per CPU when the driver connects and more for every queued task: on a laptop
    # those idle processes cost more CPU than the few seconds they save; workers start as tasks need them.
    "RAY_prestart_worker_first_driver": "0",
    "RAY_enable_worker_prestart": "0",
}
"""Ray Train, Ray Data and raylet settings of an embedded local Ray, sized for one machine (a cluster keeps Ray's
defaults). Set before ``ray.init``, so every process the instance starts inherits them."""


def start_embedded_ray(**init_kwargs: Any) -> None:
    """Start a local Ray whose own processes find it, and only it, while other Ray instances run on the host.

    Ray's state API (which Ray Train's placement-group cleaner calls from a detached actor) looks its
    cluster up by scanning the host for GCS processes unless ``RAY_API_SERVER_ADDRESS`` names the dashboard;
    with a second instance up (a ``ray start`` cluster, another terminal's run) it raised "Found multiple
    active Ray instances", the finished trial's placement group was never freed and the next trial waited
    forever. The dashboard gets a port chosen here, and every process the instance starts inherits its URL
    (and ``EMBEDDED_TRAIN_ENV``).
    """
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    os.environ.update(EMBEDDED_TRAIN_ENV)
    init_kwargs.setdefault("configure_logging", False)
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **init_kwargs)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_gpu(job: JobSpec) -> bool:
    """Whether workers get GPUs: the job's choice, or ``auto`` = the cluster has GPUs."""
    if job.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(job.scaling.use_gpu)


def build_trainer(
    job: JobSpec, info: DataInfo, datasets: dict[str, Any], num_train_rows: int, pad_token_id: int | None,
    callbacks: list[Any] | None = None, console: dict[str, Any] | None = None,
) -> TorchTrainer:
    """The ``TorchTrainer`` for a job: scaling, failure handling and checkpoint retention from the job.

    ``callbacks``: Ray Train callbacks (``shoulders tune`` passes ``TuneReportCallback``).
    ``console``: the workers' log folder and rank 0's event queue (``cluster.run.console.run_console``).
    """
    from engine.loop.faults import debug_hooks
    from engine.safeguards.guards import read_drift_texts, read_retention_texts

    gpu = use_gpu(job)
    split_files = {s.name: (s.files, s.format) for s in info.splits.values()}
    resources = {"CPU": job.scaling.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    return TorchTrainer(
        _train_loop,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "labels": info.labels,
            "num_train_rows": num_train_rows,
            "pad_token_id": pad_token_id,
            "retention_texts": read_retention_texts(job, split_files),
            "drift_texts": read_drift_texts(job, split_files),  # target rows beside the retention set
            "debug": debug_hooks(),
            "generation_samples": generation_samples(job, info),  # validation prompts answered at each evaluation
            "console": console,  # the workers' log folder and rank 0's event queue (cluster.run.console)
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.scaling.num_workers,
            use_gpu=gpu,
            resources_per_worker=resources,
            placement_strategy=job.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=storage_location(job)[1],
            storage_path=storage_location(job)[0],
            # Ray's default retries a worker group that cannot start (e.g. its resources never come) forever
            failure_config=ray.train.FailureConfig(max_failures=job.scaling.max_failures, controller_failure_limit=CONTROLLER_RETRIES),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=job.output.keep_checkpoints + 1,
                checkpoint_score_attribute=f"val_{job.eval_metric}",
                checkpoint_score_order=job.eval_mode,
            ),
        ),
        datasets=datasets,
        dataset_config=deterministic_data_config(),
    )


def deterministic_data_config() -> ray.train.DataConfig:
    """Ray Data ingest whose per-worker order is the same on every run and every restart.

    ``preserve_order`` makes ``streaming_split(equal=True)`` hand out blocks in a fixed round (locality
    hints ignored), so an epoch's batches on each rank are a deterministic sequence: a resumed run skips
    exactly the batches its checkpoint trained on and sees the rest in the same order. The validation
    split is split unevenly so every row counts exactly once (:class:`cluster.ingest.datasets.EveryRowDataConfig`).
    """
    from cluster.ingest.datasets import EveryRowDataConfig

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return EveryRowDataConfig(execution_options=options, enable_shard_locality=False)


def storage_location(job: JobSpec) -> tuple[str, str]:
    """(``RunConfig.storage_path``, run name): ``run.storage_path``/<job name>, or ``output.dir``/train.

    A URI (``s3://``, ``gs://``, ...) is passed to Ray as it is; a local path is made absolute.
    """
    from cluster.ingest.splits import is_uri

    path = job.run.storage_path
    if not path:
        return str(job.output_dir), TRAIN_DIR
    return (path if is_uri(path) else os.path.abspath(os.path.expanduser(path))), job.name


def _train_loop(config: dict[str, Any]) -> None:
    from engine.loop.console import worker_log_file
    from engine.loop.recipe import train_loop_per_worker

    with worker_log_file((config.get("console") or {}).get("log_dir"), ray.train.get_context().get_world_rank()):
        train_loop_per_worker(config)


@dataclass
class RunSummary:
    """What a finished training run produced."""

    best: dict[str, Any]
    test: dict[str, float] | None
    export_dir: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)
    """Ray node id of each training worker, in rank order."""
    layout: dict[str, Any] = field(default_factory=dict)
    """Model size, trainable share, parameter groups and steps, as training rank 0 started (``cluster.run.console``)."""


def run_training(job: JobSpec, info: DataInfo) -> RunSummary:
    """Train the job on Ray, export the best checkpoint, evaluate it on the test split, write metrics.json."""
    from engine.tasks import get_task

    ensure_ray()
    resources = ray.cluster_resources()
    check_resources(job, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
    pad_token_id = get_task(job.model.task).preprocessors(job)[1]
    datasets, num_train_rows = build_datasets(job, info)
    from cluster.run.console import run_console
    from cluster.run.tracking import Tracker

    tracker = Tracker(job)  # TensorBoard / MLflow / W&B as the job's tracking section says
    with watch_interrupts(), run_console(job) as console, tracker.running() as callbacks:  # Ctrl-C: exit 130, checkpoints kept
        result = build_trainer(job, info, datasets, num_train_rows, pad_token_id, callbacks=callbacks, console=console.worker_config).fit()
        if result.error:
            raise result.error
    candidates = result.best_checkpoints + unregistered_checkpoints(job, result.best_checkpoints)
    best_checkpoint, best = pick_best(candidates, f"val_{job.eval_metric}", job.eval_mode)
    with result.checkpoint.as_directory() as last:
        train_state = json.loads((Path(last) / "state.json").read_text())["train"]
    history, worker_nodes = train_state.get("history", []), train_state.get("worker_nodes", [])
    from engine.evaluation.generation import write_generations

    write_generations(train_state.get("generations", []), job.output_dir / "generations.jsonl")

    export_dir, test = None, None
    if job.output.export != "none":
        from engine.checkpoints.export import export_checkpoint

        with best_checkpoint.as_directory() as folder:
            export_dir = export_checkpoint(folder, job.output_dir / EXPORT_DIR, info.labels)
        if "test" in info.splits:
            test = evaluate_export(job, info, export_dir)
    summary = RunSummary(best=best, test=test, export_dir=export_dir, history=history, worker_nodes=worker_nodes, layout=console.layout)
    write_metrics(job, summary)
    from cluster.run.report import write_run_report

    tracker.finish(summary, list(write_run_report(job, info, summary)))  # curves.png, report.md
    remove_stale_checkpoints(job, [checkpoint for checkpoint, _ in result.best_checkpoints] + [result.checkpoint], best_checkpoint)
    return summary


def remove_stale_checkpoints(job: JobSpec, registered: list[Any], best: Any) -> list[str]:
    """Once the run is finished and its best model exported, delete the checkpoint folders Ray Train's
    retention never sees: not registered (written just before a driver died, or cut short by a crash) and
    not the best model, so ``output.keep_checkpoints`` holds however often the run was interrupted. Ray's
    ``num_to_keep`` looks after the registered ones. (Local storage only.)"""
    from cluster.preflight.output import local_run_dir
    from engine.checkpoints.store import RunFolder

    run_dir = local_run_dir(job)
    if run_dir is None:
        return []
    kept = {Path(checkpoint.path).name for checkpoint in registered if checkpoint is not None} | {Path(best.path).name}
    stale = [f for f in RunFolder.local(run_dir).checkpoints() if Path(f).name not in kept]
    for folder in stale:
        log.info("removing checkpoint %s: interrupted runs left it outside Ray's retention", Path(folder).name)
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def unregistered_checkpoints(job: JobSpec, registered: list[tuple[Any, dict[str, Any]]]) -> list[tuple[Any, dict[str, Any]]]:
    """Complete checkpoints in the job's (local) run folder that Ray Train does not list, with the metrics
    their ``state.json`` holds: written by the workers just before a driver died, then resumed from, they
    may hold the best model. (A URI storage path is not listed here.)"""
    from cluster.preflight.output import local_run_dir
    from engine.checkpoints.store import STATE, RunFolder, is_complete

    run_dir = local_run_dir(job)
    if run_dir is None:
        return []
    known = {Path(checkpoint.path).name for checkpoint, _ in registered}
    found = []
    for folder in map(Path, RunFolder.local(run_dir).checkpoints()):
        if folder.name in known or not is_complete(folder):
            continue
        metrics = json.loads((folder / STATE).read_text()).get("metrics")
        if metrics:
            found.append((ray.train.Checkpoint(str(folder)), metrics))
    return found


def pick_best(checkpoints: list[tuple[Any, dict[str, Any]]], key: str, mode: str) -> tuple[Any, dict[str, Any]]:
    """The (checkpoint, metrics) pair with the best ``key``."""
    if not checkpoints:
        raise JobError("training reported no checkpoint; check the worker logs above")
    sign = 1 if mode == "max" else -1
    return max(checkpoints, key=lambda pair: sign * pair[1][key])


def evaluate_export(job: JobSpec, info: DataInfo, export_dir: Path, split: str = "test") -> dict[str, float]:
    """Metrics of the exported model on a split, loaded with plain transformers/peft, streamed by Ray Data."""
    import torch

    from engine.evaluation.exported import evaluate_model, load_exported
    from engine.loop.batches import collate

    model = load_exported(export_dir, job.model.task, info.labels)
    dataset = build_eval_dataset(job, info.splits[split], info.labels, str(export_dir))
    batches = dataset.iter_torch_batches(batch_size=job.eval.batch_size or 2 * job.optim.batch_size, collate_fn=collate)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from engine.tasks import get_task

    metrics = get_task(job.model.task).export_metrics(job, model, export_dir, device)
    return evaluate_model(model, batches, job.model.task, len(info.labels) if info.labels else None, device, metrics=metrics)


def write_metrics(job: JobSpec, summary: RunSummary) -> Path:
    """``metrics.json`` in the output folder (written to a temporary name, then renamed)."""
    path = job.output_dir / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    payload = {
        "job": job.name,
        "best_validation": summary.best,
        "test": summary.test,
        "export_dir": str(summary.export_dir) if summary.export_dir else None,
        "history": summary.history,
        "worker_nodes": summary.worker_nodes,
    }
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    return path
