"""The training workers' side of the console: their output into log files in the run folder, and rank 0's
progress and evaluations to the driver, which prints them (``cluster.run.console``)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

PROGRESS_EVERY_S = 1.0


@contextlib.contextmanager
def worker_log_file(log_dir: str | None, rank: int) -> Iterator[Path | None]:
    """While training, this worker's logging, warnings, prints and transformers' messages go to
    ``<log_dir>/worker-<rank>.log`` (appended: a restarted worker adds to it). ``log_dir`` None (``--verbose``,
    or a folder this node cannot create) leaves the output as it is."""
    path = _open_log_dir(log_dir, rank)
    if path is None:
        yield None
        return
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    with open(path, "a", buffering=1) as out:
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        logging.captureWarnings(False)  # a stale capture would make True a no-op
        logging.captureWarnings(True)
        _route_transformers()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                yield path
        finally:
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)


def _open_log_dir(log_dir: str | None, rank: int) -> Path | None:
    if not log_dir:
        return None
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return Path(log_dir) / f"worker-{rank}.log"


def _route_transformers() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


class RunEvents:
    """Rank 0's messages to the driver's console: ``start``, ``progress`` (at most once a second), ``eval``,
    ``note``. A missing, full or vanished queue never stops training."""

    def __init__(self, queue: Any | None, rank: int):
        self.queue = queue if rank == 0 else None
        self.last_progress = 0.0

    def send(self, event: str, **fields: Any) -> None:
        if self.queue is None:
            return
        try:  # fire and forget: training never waits for the console (a full queue drops the event)
            self.queue.actor.put_nowait.remote({"event": event, **fields})
        except Exception as exc:  # noqa: BLE001 - the console is never worth a failed run
            print(f"console queue: {exc}", file=sys.stderr)

    def progress_due(self, step: int, total: int) -> bool:
        """Whether to send a progress event now (the caller then reads the loss, a device sync)."""
        if self.queue is None:
            return False
        now = time.monotonic()
        if now - self.last_progress >= PROGRESS_EVERY_S or step >= total:
            self.last_progress = now
            return True
        return False
