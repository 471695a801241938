"""What a run shows on the console: by default only shoulders speaks.

A header (where Ray runs, the job, the model and its trainable share, the data), one progress line with
loss and ETA, a line per evaluation, the verdicts and the final table. Everything Ray, transformers and
DeepSpeed print goes to log files in the run folder (``logs/driver.log`` here, ``logs/worker-<rank>.log``
on each training worker, see ``engine.loop.worker_output``; the routing is ``cluster.run.driver_logs``);
``--verbose`` shows it all on the console instead.

The training workers' rank 0 sends its progress and evaluations through a ``ray.util.queue.Queue`` (an
actor, so it works from any node and under the Jobs API); a thread here prints them. Warnings and errors
of shoulders' own loggers, and errors of any logger, still reach the console.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, TextIO

LOG_DIR = "logs"
DRIVER_LOG = "driver.log"
VERBOSE_ENV = "SHOULDERS_VERBOSE"
"""``1`` shows Ray's, transformers' and DeepSpeed's output on the console (what ``--verbose`` sets)."""
OWN_LOGGERS = ("cluster", "engine", "__main__")
PLAIN_PROGRESS_EVERY = 0.25
"""Without a terminal, a progress line is printed each time this share of the steps is done."""


def set_verbose(on: bool) -> None:
    """Choose the console for this process and the processes it starts (``--verbose``)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def is_verbose() -> bool:
    """Whether everything is shown on the console, as Ray and the libraries print it."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ray_init_kwargs() -> dict[str, Any]:
    """``ray.init`` arguments for this console: worker output reaches the driver only with ``--verbose``."""
    if is_verbose():
        return {"log_to_driver": True}
    return {"log_to_driver": False, "configure_logging": False}  # Ray's loggers keep going to logs/driver.log


def say(text: str, stream: TextIO | None = None) -> None:
    """Print one console line of shoulders' own (flushed: the Jobs API tails it live)."""
    print(text, file=stream or sys.stdout, flush=True)


def log_dir(output_dir: str | os.PathLike) -> Path:
    """The folder of a run's log files."""
    return Path(output_dir).absolute() / LOG_DIR


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def bar_line(step: int, total: int, loss: float | None, eta_s: float | None, width: int = 24) -> str:
    """``step 40/96 [##########--------------]  42%  loss 0.8123  eta 35s``."""
    done = int(width * step / max(total, 1))
    text = f"step {step}/{total} [{'#' * done}{'-' * (width - done)}] {100 * step / max(total, 1):3.0f}%"
    if loss is not None:
        text += f"  loss {loss:.4f}"
    if eta_s is not None:
        text += f"  eta {format_duration(eta_s)}"
    return text


COUNTS = ("val_rows",)
"""Reported numbers that are counts, not metrics: left out of the evaluation lines and the table."""


def metric_keys(metrics: dict[str, Any]) -> list[str]:
    """The validation metrics of a report, in order (counts left out)."""
    return [k for k, v in metrics.items() if k.startswith("val_") and k not in COUNTS and isinstance(v, (int, float))]


def eval_line(metrics: dict[str, Any]) -> str:
    """One line per evaluation: step, training loss, the validation metrics, forgetting and drift."""
    parts = [f"eval @ step {metrics.get('step')}"]
    if "train_loss" in metrics:
        parts.append(f"train_loss {metrics['train_loss']:.4f}")
    parts += [f"{k} {metrics[k]:.4f}" for k in metric_keys(metrics)]
    # the safeguards' probes: forgetting of the source on the retention set, drift on the target's rows
    parts += [f"{k} {metrics[k]:.4f}" for k in ("forgetting", "drift") if isinstance(metrics.get(k), (int, float))]
    return "  ".join(parts)


def format_count(n: float) -> str:
    """``850``, ``22.1k``, ``22.7M``, ``1.24B``."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


def trainable_line(event: dict[str, Any]) -> str:
    """The model's size and trainable share, and how the run is laid out, from rank 0's ``start`` event."""
    total, trainable = event["parameters"], event["trainable"]
    return (
        f"model: {format_count(total)} parameters, {format_count(trainable)} trainable ({100 * trainable / max(total, 1):.1f}%); "
        f"{event['total_steps']} steps on {event['world_size']} worker(s), evaluation every {event['eval_every']}"
    )


class ProgressPrinter:
    """Prints rank 0's events: on a terminal one rich progress bar (step, bar, percent, loss, ETA) kept
    below the evaluation lines; otherwise a plain progress line each quarter of the run, one line per report."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.bar: Any = None  # the rich Progress, once the first progress event came (terminal only)
        self.bar_task: Any = None
        self.next_plain = PLAIN_PROGRESS_EVERY
        self.start_event: dict[str, Any] = {}

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            self.start_event = event
            self.line(trainable_line(event))
        elif kind == "progress":
            self.progress(event)
        elif kind == "eval":
            self.line(eval_line(event["metrics"]))
        elif kind == "note":
            self.line(event["text"])

    def progress(self, event: dict[str, Any]) -> None:
        step, total = event["step"], max(event["total"], 1)
        if self.tty:
            loss, eta = event.get("loss"), event.get("eta")
            fields = {"loss": f"loss {loss:.4f}" if loss is not None else "", "eta": f"eta {format_duration(eta)}" if eta is not None else ""}
            if self.bar is None:
                self.bar, self.bar_task = rich_progress(self.stream, total, fields)
            self.bar.update(self.bar_task, completed=step, total=total, **fields)
            self.bar.refresh()
        elif step / total >= self.next_plain:
            while self.next_plain <= step / total:
                self.next_plain += PLAIN_PROGRESS_EVERY
            self.line(bar_line(step, total, event.get("loss"), event.get("eta")))

    def line(self, text: str) -> None:
        if self.bar is not None:  # printed above the live bar
            self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()  # the bar's last state stays on the terminal
            self.bar = None


def rich_progress(stream: TextIO, total: int, fields: dict[str, str]) -> tuple[Any, Any]:
    """A started rich progress bar on ``stream``, refreshed by the caller (no thread of its own) and leaving
    stdout and stderr alone; returns it with its task."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn

    console = Console(file=stream, force_terminal=True)
    bar = Progress(
        TextColumn("step"), MofNCompleteColumn(), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[eta]}"),
        console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False,
    )
    bar.start()
    return bar, bar.add_task("train", total=total, **fields)


class ConsoleFeed:
    """A queue the training workers' rank 0 puts its events in, and the thread here that prints them.

    ``handle`` goes into the train-loop config; ``close`` prints what is left and removes the queue actor.
    """

    def __init__(self, printer: ProgressPrinter | None = None):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node, as Ray Train's controller is: the console outlives any worker node lost mid-run.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.printer = printer or ProgressPrinter()
        self.listeners: list[Any] = []
        """Called with every event after the printer (the node-loss guard counts the steps)."""
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._drain, name="shoulders-console", daemon=True)
        self.thread.start()

    @property
    def handle(self) -> Any:
        return self.queue

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                event = self.queue.get(timeout=0.5)
                self.printer.handle(event)
                for listener in self.listeners:
                    listener(event)
            except Empty:
                if self.stopping.is_set():
                    return
            except Exception:  # the queue actor is gone (Ray shut down): nothing more to print
                return

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.printer.close()
        try:
            self.queue.shutdown(force=True)
        except Exception:
            pass


class RunConsole:
    """One training run's console: ``worker_config`` goes into the train-loop config (the workers' log
    folder and rank 0's event queue); ``layout`` is rank 0's ``start`` event once it came (model size,
    trainable share, parameter groups, steps)."""

    def __init__(self, worker_config: dict[str, Any], printer: ProgressPrinter | None, feed: ConsoleFeed | None = None):
        self.worker_config, self.printer, self.feed = worker_config, printer, feed

    def listen(self, listener: Any) -> None:
        """Call ``listener(event)`` with each of rank 0's events from now on."""
        if self.feed is not None:
            self.feed.listeners.append(listener)

    @property
    def layout(self) -> dict[str, Any]:
        return dict(self.printer.start_event) if self.printer else {}


@contextlib.contextmanager
def run_console(job: Any) -> Iterator[RunConsole]:
    """A training run's console, with the feed that prints rank 0's events while the run lasts. With
    ``--verbose`` the workers log to the console as they always did (their lines carry the same news) and the
    feed prints nothing: it still carries the steps to the listeners."""
    import ray

    verbose = is_verbose()
    # the log folder is on the driver's disk: workers on other nodes leave their lines to Ray's log streaming
    driver_node = ray.get_runtime_context().get_node_id()
    with open(os.devnull, "w") as silent:
        feed = ConsoleFeed(ProgressPrinter(silent, tty=False) if verbose else None)
        try:
            folder = None if verbose else str(log_dir(job.output_dir))
            yield RunConsole({"queue": feed.handle, "log_dir": folder, "node": driver_node}, feed.printer, feed)
        finally:
            feed.close()


def ray_line(job: Any) -> str:
    """Where Ray runs: the embedded local instance or the cluster joined, its size and the workers asked for."""
    import ray

    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    address = os.environ.get("RAY_ADDRESS")
    where = f"Ray cluster at {address}" if address else "embedded local Ray"
    return (
        f"ray: {where}, {nodes} node(s), {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU; "
        f"{job.scaling.num_workers} training worker(s) x {job.scaling.cpus_per_worker:g} CPU"
    )


def header_lines(job: Any, info: Any, ray_text: str) -> list[str]:
    """The lines a run starts with."""
    method = ", ".join(filter(None, [job.finetune.strategy, None if job.peft.method == "none" else job.peft.method]))
    rows = ", ".join(f"{name} {split.num_rows}" for name, split in info.splits.items())
    labels = f"; {len(info.labels)} labels: {', '.join(info.labels)}" if info.labels else ""
    logs = "on the console (--verbose)" if is_verbose() else f"{log_dir(job.output_dir)} (Ray, transformers, each worker; --verbose shows them here)"
    return [
        f"shoulders: job '{job.name}', {job.model.task} on {job.model.name} ({method or 'custom'}, freeze depth {job.finetune.freeze_depth})",
        f"data: {rows} rows{labels}",
        ray_text,
        f"logs: {logs}",
    ]
