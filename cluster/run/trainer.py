"""Building and running the Ray Train ``TorchTrainer`` for a job, then exporting and testing the best model."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from cluster.ingest.datasets import build_datasets
from cluster.ingest.splits import DataInfo
from cluster.ingest.text import answer_samples
from cluster.preflight.output import check_resources, run_dir_location
from cluster.run.export_task import evaluate_export  # noqa: F401  (shoulders eval's entry point)
from cluster.run.interrupts import watch_interrupts
from cluster.run.node_loss import guard_node_loss
from engine.checkpoints.atomic import write_atomic
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
        ray.init(address=address, **storage_runtime_env(), **ray_init_kwargs())
    else:
        secure_embedded_token()  # the token file Ray would write readable by all: mode 600
        start_embedded_ray(**ray_init_kwargs())


def storage_runtime_env() -> dict[str, Any]:
    """``ray.init``'s ``runtime_env`` carrying the storage credentials and endpoint set here (``AWS_*``, ...) to
    every worker of a cluster this driver connects to; empty inside a submitted job (its runtime environment,
    which already carries them, must not be replaced) and when none is set."""
    from engine.checkpoints.storage import credential_env

    env_vars = credential_env()
    if not env_vars or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return {}
    return {"runtime_env": {"env_vars": env_vars}}


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
    with a second instance up (a ``ray start`` cluster, another terminal's run) that scan raises "Found
    multiple active Ray instances", a finished trial's placement group is never freed and the next trial
    waits forever. So the dashboard gets a port chosen here, and every process the instance starts inherits
    its URL (and ``EMBEDDED_TRAIN_ENV``).
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
    from engine.loop.faults import fault_settings
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
            "faults": fault_settings(),
            "answer_samples": answer_samples(job, info),  # validation prompts answered at each evaluation
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
    from engine.checkpoints.storage import is_uri

    path = job.run.storage_path
    if not path:
        return str(job.output_dir), TRAIN_DIR
    return (path if is_uri(path) else os.path.abspath(os.path.expanduser(path))), job.name


def _train_loop(config: dict[str, Any]) -> None:
    from engine.loop.worker_output import worker_log_file
    from engine.loop.recipe import train_loop_per_worker

    console = config.get("console") or {}
    on_driver_node = console.get("node") in (None, ray.get_runtime_context().get_node_id())
    with worker_log_file(console.get("log_dir") if on_driver_node else None, ray.train.get_context().get_world_rank()):
        train_loop_per_worker(config)


@dataclass
class RunSummary:
    """What a finished training run produced."""

    best: dict[str, Any]
    test: dict[str, float] | None
    export_dir: str | None
    """Where the export is: a local folder or a URI (``output.uri``/model)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)
    """Ray node id of each training worker, in rank order."""
    layout: dict[str, Any] = field(default_factory=dict)
    """Model size, trainable share, parameter groups and steps, as training rank 0 started (``cluster.run.console``)."""


def run_training(job: JobSpec, info: DataInfo) -> RunSummary:
    """Train the job on Ray, export the best checkpoint and evaluate it on the test split (both in a Ray task
    with a worker's resources, :mod:`cluster.run.export_task`), write metrics.json and the report."""
    from engine.tasks import get_task

    ensure_ray()
    resources = ray.cluster_resources()
    check_resources(job, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
    from cluster.run.shared_disk import check_shared_locations, local_write_locations

    check_shared_locations(local_write_locations(job, storage_location(job)[0]))  # local folders on a multi-node cluster: every node must see them
    pad_token_id = get_task(job.model.task).preprocessors(job)[1]
    datasets, num_train_rows = build_datasets(job, info)
    from cluster.run.console import run_console
    from cluster.run.tracking import Tracker

    tracker = Tracker(job)  # TensorBoard / MLflow / W&B as the job's tracking section says
    with run_console(job) as console, guard_node_loss(job.scaling.node_loss_timeout_s, node_lost_message(job)) as guard:
        console.listen(guard.on_event)  # a lost node with no step after it within the timeout ends the run
        with watch_interrupts(), tracker.running() as callbacks:  # Ctrl-C: exit 130, checkpoints kept
            result = build_trainer(job, info, datasets, num_train_rows, pad_token_id, callbacks=callbacks, console=console.worker_config).fit()
            if result.error:
                raise result.error
    candidates = result.best_checkpoints + unregistered_checkpoints(job, result.best_checkpoints)
    best_checkpoint, best = pick_best(candidates, f"val_{job.eval_metric}", job.eval_mode)
    train_state = read_checkpoint_json(result.checkpoint, "state.json")["train"]  # a small file, not the checkpoint
    history, worker_nodes = train_state.get("history", []), train_state.get("worker_nodes", [])
    from engine.evaluation.answers import write_answers

    write_answers(train_state.get("answers", []), job.output_dir / "answers.jsonl")

    export_dir, test = None, None
    if job.output.export != "none":
        from cluster.run.export_task import export_and_test
        from engine.checkpoints.storage import join

        export_dir = join(job.results_location, EXPORT_DIR)
        test = export_and_test(job, info, best_checkpoint, export_dir, use_gpu(job))
    summary = RunSummary(best=best, test=test, export_dir=export_dir, history=history, worker_nodes=worker_nodes, layout=console.layout)
    write_metrics(job, summary)
    from cluster.run.report import write_run_report

    tracker.finish(summary, list(write_run_report(job, info, summary)))  # curves.png, report.md
    remove_stale_checkpoints(job, [checkpoint for checkpoint, _ in result.best_checkpoints] + [result.checkpoint], best_checkpoint)
    copy_results(job)  # to output.uri when set (``shoulders train`` copies them again after the transfer verdict)
    return summary


def node_lost_message(job: JobSpec) -> Any:
    """The one-line ending of a run of ``job`` that lost a node and could not go on (:mod:`cluster.run.node_loss`)."""
    from cluster.run.node_loss import JOB_ARGS_ENV, node_lost_message as line, resume_hint, submitted_job

    resume = resume_hint(os.environ.get(JOB_ARGS_ENV), submitted_job())
    return lambda node, waited_s, step, cause=None: line(node, waited_s, step, run_dir_location(job), resume, cause, job.scaling.max_failures)


RESULT_FILES = ("metrics.json", "report.md", "curves.png", "answers.jsonl", "transfer.json")
"""Small files of a run's output folder that ``output.uri`` receives too."""


def copy_results(job: JobSpec, names: tuple[str, ...] = RESULT_FILES) -> list[str]:
    """Copy the run's small result files from ``output.dir`` to ``output.uri`` (when set); returns their locations."""
    from engine.checkpoints import storage

    if not job.output.uri:
        return []
    copied = []
    for file_name in names:
        path = job.output_dir / file_name
        if path.is_file():
            location = storage.join(job.results_location, file_name)
            storage.write_bytes(location, path.read_bytes())
            copied.append(location)
    return copied


def read_checkpoint_json(checkpoint: Any, file_name: str) -> dict[str, Any]:
    """One JSON file of a ``ray.train.Checkpoint`` read through its filesystem (local or object storage)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{file_name}") as stream:
        return json.loads(stream.read())


def remove_stale_checkpoints(job: JobSpec, registered: list[Any], best: Any) -> list[str]:
    """Once the run is finished and its best model exported, delete the checkpoint folders Ray Train's
    retention never sees: not registered (written just before a driver died, or cut short by a crash) and
    not the best model, so ``output.keep_checkpoints`` holds however often the run was interrupted. Ray's
    ``num_to_keep`` looks after the registered ones. Local storage and object storage alike."""
    from engine.checkpoints import storage
    from engine.checkpoints.store import RunFolder

    kept = {storage.name(checkpoint.path) for checkpoint in registered if checkpoint is not None} | {storage.name(best.path)}
    run = RunFolder.at(run_dir_location(job))
    stale = [f for f in run.checkpoints() if storage.name(f) not in kept]
    for folder in stale:
        log.info("removing checkpoint %s: interrupted runs left it outside Ray's retention", storage.name(folder))
        try:
            run.filesystem.delete_dir(folder)
        except OSError as exc:
            log.warning("could not remove checkpoint %s: %s", folder, exc)
    return stale


def unregistered_checkpoints(job: JobSpec, registered: list[tuple[Any, dict[str, Any]]]) -> list[tuple[Any, dict[str, Any]]]:
    """Complete checkpoints in the job's run folder (local or object storage) that Ray Train does not list,
    with the metrics their ``state.json`` holds: written by the workers just before a driver died, then
    resumed from, they may hold the best model. Completeness is read from the manifests and file sizes on
    storage; nothing is downloaded but the small JSON files."""
    from engine.checkpoints import storage
    from engine.checkpoints.store import STATE, RunFolder

    known = {storage.name(checkpoint.path) for checkpoint, _ in registered}
    run = RunFolder.at(run_dir_location(job))
    found = []
    for folder in run.checkpoints():
        if storage.name(folder) in known or run.incomplete_reason(folder) is not None:
            continue
        checkpoint = ray.train.Checkpoint(folder, filesystem=run.filesystem)
        metrics = read_checkpoint_json(checkpoint, STATE).get("metrics")
        if metrics:
            found.append((checkpoint, metrics))
    return found


def pick_best(checkpoints: list[tuple[Any, dict[str, Any]]], key: str, mode: str) -> tuple[Any, dict[str, Any]]:
    """The (checkpoint, metrics) pair with the best ``key``."""
    if not checkpoints:
        raise JobError("training reported no checkpoint; check the worker logs above")
    sign = 1 if mode == "max" else -1
    return max(checkpoints, key=lambda pair: sign * pair[1][key])


def write_metrics(job: JobSpec, summary: RunSummary) -> Path:
    """``metrics.json`` in the output folder (written to a temporary name, then renamed)."""
    payload = {
        "job": job.name,
        "best_validation": summary.best,
        "test": summary.test,
        "export_dir": str(summary.export_dir) if summary.export_dir else None,
        "history": summary.history,
        "worker_nodes": summary.worker_nodes,
    }
    return write_atomic(job.output_dir / "metrics.json", json.dumps(payload, indent=1))
