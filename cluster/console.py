"""What a run shows on the console: by default only shoulders speaks.

A header (where Ray runs, the job, the model and its trainable share, the data), one progress line with
loss and ETA, a line per evaluation, the verdicts and the final table. Everything Ray, transformers and
DeepSpeed print goes to log files in the run folder (``logs/driver.log`` here, ``logs/worker-<rank>.log``
on each training worker, see ``engine.worker_logs``); ``--verbose`` shows it all on the console instead.

The training workers' rank 0 sends its progress and evaluations through a ``ray.util.queue.Queue`` (an
actor, so it works from any node and under the Jobs API); a thread here prints them. Warnings and errors
of shoulders' own loggers, and errors of any logger, still reach the console.
"""

from __future__ import annotations

import contextlib
import logging
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


class _OwnWarnings(logging.Filter):
    """Passes errors of any logger, and warnings of shoulders' own modules."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".")[0] in OWN_LOGGERS


def route_driver_logs(output_dir: str | os.PathLike) -> Path | None:
    """Send this process's logging (Ray's, Ray Data's, transformers', Python warnings) to
    ``logs/driver.log`` in the run folder; the console keeps shoulders' warnings and every error.
    Handlers that write elsewhere (a test's log capture) stay; a second run in the same process replaces
    the first one's. Does nothing with ``--verbose``. Returns the log file."""
    if is_verbose():
        return None
    import ray.data  # noqa: F401  (Ray and Ray Data set up their loggers when imported: rewire them after)

    folder = log_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DRIVER_LOG
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setLevel(logging.WARNING)
    to_console.addFilter(_OwnWarnings())
    to_console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    for handler in (to_file, to_console):
        handler.shoulders = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    console_streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    for handler in list(root.handlers):
        if getattr(handler, "shoulders", False) or (
            type(handler) is logging.StreamHandler and id(getattr(handler, "stream", None)) in console_streams
        ):
            root.removeHandler(handler)
    root.addHandler(to_file)
    root.addHandler(to_console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    # Ray's and Ray Data's loggers print through console handlers of their own and do not propagate: drop
    # those and let them propagate to the handlers above (``ray.init(configure_logging=False)`` then clears
    # the "ray" logger's handlers and leaves it so; their own session log files stay).
    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")] + ["ray"]:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
    quiet_transformers()
    divert_raylet_warnings()
    return path


def divert_raylet_warnings() -> None:
    """Ray's driver prints the raylets' messages (e.g. "WARNING: 8 PYTHON worker processes have been
    started ...", common with fractional worker CPUs) straight to stdout, through no logger, whatever
    ``log_to_driver`` says. Their warning lines go to the driver's log file instead; errors still print.
    (Ray offers no switch for this: the printer it calls is wrapped here, when it is where Ray 2.60 has it.)"""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "diverted_by_shoulders", False):
        return
    raylet_log = logging.getLogger("ray.raylet_messages")

    def printer(data: dict[str, Any], ignore_prefix: bool) -> None:
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and lines and all(str(line).lstrip().startswith("WARNING") for line in lines):
            for line in lines:
                raylet_log.info("raylet: %s", line)
            return
        original(data, ignore_prefix)

    printer.diverted_by_shoulders = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = printer


def quiet_transformers() -> None:
    """transformers logs through the root logger (so into the log file) and draws no download or load bars."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # not installed where only the remote commands run
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


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
    """One line per evaluation: step, training loss and the validation metrics."""
    parts = [f"eval @ step {metrics.get('step')}"]
    if "train_loss" in metrics:
        parts.append(f"train_loss {metrics['train_loss']:.4f}")
    parts += [f"{k} {metrics[k]:.4f}" for k in metric_keys(metrics)]
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
    """Prints rank 0's events: on a terminal one progress line rewritten in place (evaluations above it);
    otherwise a plain progress line each quarter of the run."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.bar_shown = False
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
        text = bar_line(event["step"], event["total"], event.get("loss"), event.get("eta"))
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
            self.bar_shown = True
        elif event["step"] / max(event["total"], 1) >= self.next_plain:
            while self.next_plain <= event["step"] / max(event["total"], 1):
                self.next_plain += PLAIN_PROGRESS_EVERY
            self.line(text)

    def line(self, text: str) -> None:
        if self.bar_shown:
            self.stream.write("\r\x1b[2K")
            self.bar_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self.bar_shown = False


class ConsoleFeed:
    """A queue the training workers' rank 0 puts its events in, and the thread here that prints them.

    ``handle`` goes into the train-loop config; ``close`` prints what is left and removes the queue actor.
    """

    def __init__(self, printer: ProgressPrinter | None = None):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        self.printer = printer or ProgressPrinter()
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
                self.printer.handle(self.queue.get(timeout=0.5))
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

    def __init__(self, worker_config: dict[str, Any], printer: ProgressPrinter | None):
        self.worker_config, self.printer = worker_config, printer

    @property
    def layout(self) -> dict[str, Any]:
        return dict(self.printer.start_event) if self.printer else {}


@contextlib.contextmanager
def run_console(job: Any) -> Iterator[RunConsole]:
    """A training run's console, with the feed that prints rank 0's events while the run lasts. With
    ``--verbose`` the workers log to the console as they always did (their lines carry the same news)."""
    if is_verbose():
        yield RunConsole({"queue": None, "log_dir": None}, None)
        return
    feed = ConsoleFeed()
    try:
        yield RunConsole({"queue": feed.handle, "log_dir": str(log_dir(job.output_dir))}, feed.printer)
    finally:
        feed.close()


def start_run(job: Any, info: Any, command: str = "train") -> list[str]:
    """Route this process's logs into the run folder, start (or join) Ray, and print the header:
    the job, the data, where Ray runs and where the logs are. Returns the lines printed."""
    route_driver_logs(job.output_dir)
    from cluster.trainer import ensure_ray

    ensure_ray()
    lines = header_lines(job, info, ray_line(job))
    for line in lines:
        say(line)
    return lines


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
