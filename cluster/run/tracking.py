"""Experiment tracking through the libraries' own APIs: TensorBoard (``torch.utils.tensorboard``), MLflow
(``MlflowClient``) and Weights & Biases (``wandb``), as the job's ``tracking`` section says.

Every report of training rank 0 is logged live by a Ray Train ``UserCallback``, which Ray runs in the Train
controller, an actor pinned to the driver's node, so its files land in the driver's output folder. The
driver opens the MLflow run before the fit (the job as parameters) and closes it afterwards with the test
metrics and the run's plots. W&B likewise: the driver picks the run's id, the callback opens that run in the
controller and logs each report as it comes (a W&B run belongs to the process that opens it), and the driver
reopens it by id at the end for the test metrics (``resume="allow"``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from ray.train import UserCallback

log = logging.getLogger(__name__)
TB_DIR = "tensorboard"
MLFLOW_BATCH = 100
"""MLflow accepts at most 100 parameters per ``log_batch`` call."""


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a report (``step`` is the x axis, not a metric)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def mlflow_client(uri: str | None) -> Any:
    """``MlflowClient`` for ``uri``. A local file store (``file:...`` or a path) is what the job asked for:
    MLflow 3 refuses one unless ``MLFLOW_ALLOW_FILE_STORE`` is set, so it is set here (for this process)."""
    import os

    from mlflow import MlflowClient

    if uri and ("://" not in uri or uri.startswith("file:")):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(uri)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested job dict as dotted keys -> strings (MLflow parameters)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:500]
    return flat


class TrackingCallback(UserCallback):
    """Logs every report of rank 0 to TensorBoard, MLflow and W&B, against the report's ``step``.

    ``wandb_init``: the ``wandb.init`` arguments of the run (its id chosen by the driver), or None."""

    def __init__(self, tensorboard_dir: str | None, mlflow_uri: str | None = None, mlflow_run_id: str | None = None,
                 wandb_init: dict[str, Any] | None = None):
        self.tensorboard_dir, self.mlflow_uri, self.mlflow_run_id = tensorboard_dir, mlflow_uri, mlflow_run_id
        self.wandb_init = wandb_init
        self._writer: Any = None
        self._wandb: Any = None

    def __getstate__(self) -> dict[str, Any]:  # sent to the controller actor without an open writer or run
        return {**self.__dict__, "_writer": None, "_wandb": None}

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics:
            return
        step, values = int(metrics[0].get("step", 0)), scalars(metrics[0])
        try:
            if self.tensorboard_dir:
                self._tensorboard(values, step)
            if self.mlflow_run_id:
                from mlflow.entities import Metric

                stamp = int(time.time() * 1000)
                mlflow_client(self.mlflow_uri).log_batch(self.mlflow_run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])
            if self.wandb_init:
                self.wandb_run().log(values, step=step)
        except Exception as exc:  # noqa: BLE001 - tracking never stops a run
            log.warning("tracking: could not log step %d: %s", step, exc)

    def after_exception(self, run_context: Any, worker_exceptions: Any) -> None:
        self.close_wandb(1)

    def wandb_run(self) -> Any:
        """The W&B run, opened in this process at the first report."""
        if self._wandb is None:
            import wandb

            self._wandb = wandb.init(**self.wandb_init)
        return self._wandb

    def close_wandb(self, exit_code: int = 0) -> None:
        """Finish this process's hold on the W&B run (the driver reopens it for the final metrics)."""
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
            self._wandb = None

    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.tensorboard_dir)
        return self._writer

    def _tensorboard(self, values: dict[str, float], step: int) -> None:
        writer = self.writer()
        for key, value in values.items():
            writer.add_scalar(key, value, step)
        writer.flush()


class Tracker:
    """The tracking of one training run (or one tune trial) on the driver's side."""

    def __init__(self, job: Any):
        self.job, self.spec = job, job.tracking
        self.mlflow_run_id: str | None = None
        self.wandb_init: dict[str, Any] | None = None

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.job.output_dir).absolute() / TB_DIR

    def start(self) -> list[Any]:
        """Open the MLflow run (when asked for) and return the Ray Train callbacks that log the reports."""
        if self.spec.mlflow:
            self.mlflow_run_id = self._start_mlflow()
        if self.spec.wandb:
            self.wandb_init = self._wandb_init()
        if not (self.spec.tensorboard or self.mlflow_run_id or self.wandb_init):
            return []
        tensorboard = str(self.tensorboard_dir) if self.spec.tensorboard else None
        return [TrackingCallback(tensorboard, self.spec.mlflow, self.mlflow_run_id, self.wandb_init)]

    def _wandb_init(self) -> dict[str, Any] | None:
        """The ``wandb.init`` arguments of this run, with an id picked here so every process logs to one run."""
        try:
            import wandb
        except ImportError:
            log.warning("tracking.wandb is set but wandb is not installed (pip install wandb); not logging to W&B")
            return None
        return {"project": self.spec.wandb, "name": self.job.name, "id": wandb.util.generate_id(), "resume": "allow",
                "config": self.job.model_dump(mode="json"), "dir": str(Path(self.job.output_dir).absolute())}

    def _start_mlflow(self) -> str | None:
        try:
            from mlflow.entities import Param
        except ImportError:
            log.warning("tracking.mlflow is set but mlflow is not installed (pip install mlflow); not logging to MLflow")
            return None
        client = mlflow_client(self.spec.mlflow)
        name = self.spec.mlflow_experiment or self.job.name
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run = client.create_run(experiment_id, run_name=self.job.name, tags={"shoulders.output_dir": str(self.job.output_dir)})
        params = [Param(k, v) for k, v in flatten(self.job.model_dump(mode="json")).items()]
        for i in range(0, len(params), MLFLOW_BATCH):
            client.log_batch(run.info.run_id, params=params[i:i + MLFLOW_BATCH])
        return run.info.run_id

    @contextlib.contextmanager
    def running(self) -> Iterator[list[Any]]:
        """``start``, and mark the MLflow run failed if the block raises."""
        callbacks = self.start()
        try:
            yield callbacks
        except BaseException:
            self.close("FAILED")
            raise

    def finish(self, summary: Any, files: list[Path] | None = None) -> None:
        """Log the best validation and test metrics and the run's files, close the MLflow run, write W&B."""
        final = {**{f"best_{k}": v for k, v in scalars(summary.best).items()}, **{f"test_{k}": v for k, v in scalars(summary.test or {}).items()}}
        if self.spec.tensorboard and summary.test:
            writer = TrackingCallback(str(self.tensorboard_dir)).writer()
            step = int(summary.best.get("step", 0))
            for key, value in final.items():
                writer.add_scalar(key, value, step)
            writer.close()
        if self.mlflow_run_id:
            from mlflow.entities import Metric

            client, stamp = mlflow_client(self.spec.mlflow), int(time.time() * 1000)
            client.log_batch(self.mlflow_run_id, metrics=[Metric(k, v, stamp, int(summary.best.get("step", 0))) for k, v in final.items()])
            for path in files or []:
                if Path(path).is_file():
                    client.log_artifact(self.mlflow_run_id, str(path))
            self.close("FINISHED")
        if self.wandb_init:
            self._finish_wandb(final)

    def close(self, status: str) -> None:
        if self.mlflow_run_id:
            mlflow_client(self.spec.mlflow).set_terminated(self.mlflow_run_id, status)
            self.mlflow_run_id = None

    def _finish_wandb(self, final: dict[str, float]) -> None:
        """Reopen the W&B run (its history was logged live) to add the best and test metrics, and finish it."""
        import wandb

        Path(self.wandb_init["dir"]).mkdir(parents=True, exist_ok=True)
        run = wandb.init(**self.wandb_init)
        run.summary.update(final)
        run.finish()
