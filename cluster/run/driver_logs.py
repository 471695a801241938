"""The driver's logs go to ``logs/driver.log`` in the run folder, not the console: Ray's and Ray Data's
loggers, transformers, Python warnings and the raylets' warnings. Shoulders' own warnings and every error
still reach the console. (``--verbose`` leaves all of it as the libraries set it up.)"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from cluster.run.console import DRIVER_LOG, OWN_LOGGERS, is_verbose, log_dir


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
    logging.captureWarnings(False)  # a stale capture (an earlier run in this process) would make True a no-op
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
    quiet_deepspeed()
    return path


def quiet_deepspeed() -> None:
    """DeepSpeed, when anything imports it, prints "Setting accelerator to CPU ..." to stdout through a
    handler of its own unless ``DS_ACCELERATOR`` names the accelerator: name it on a machine without a GPU
    (an embedded Ray's workers inherit it; a cluster's workers keep their own environment)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


RETRY_NOTICE = re.compile(r"^Task \S+ failed\. There are (infinite|\d+) retries remaining")
"""The raylet's note that a task will be retried (e.g. a Ray Data ``_map_task`` of a trial ASHA stopped, whose
consumer is gone), printed with an empty error: the run's business, not the console's."""


def is_raylet_notice(line: str) -> bool:
    """Whether a raylet line is a warning or a retry notice (to the log file) rather than an error (to the console)."""
    line = line.lstrip()
    return line.startswith("WARNING") or bool(RETRY_NOTICE.match(line))


def divert_raylet_warnings() -> None:
    """Ray's driver prints the raylets' messages (e.g. "WARNING: 8 PYTHON worker processes have been
    started ...", common with fractional worker CPUs, or "Task _map_task failed. There are infinite retries
    remaining ..." when a stopped trial's data tasks die) straight to stdout, through no logger, whatever
    ``log_to_driver`` says. Their warning and retry lines go to the driver's log file instead; errors still print.
    (Ray offers no switch for this: the printer it calls is wrapped here, when it is where Ray 2.60 has it.)"""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "diverted_by_shoulders", False):
        return
    raylet_log = logging.getLogger("ray.raylet_messages")

    def printer(data: dict[str, Any], ignore_prefix: bool) -> None:
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and lines and all(is_raylet_notice(str(line)) for line in lines):
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
