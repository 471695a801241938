"""A Ray node lost in the middle of a training run: say so, and never wait for a recovery that cannot come.

Ray Train restarts the worker group from the last reported checkpoint when a worker's node dies
(``scaling.max_failures``), and Ray Data re-runs the read and preprocessing tasks that ran there. Both wait,
without limit, for the resources they need: when the nodes left cannot hold the workers and a Ray Data task
at once (e.g. one half-CPU worker on each remaining one-CPU node, and every data task asking for a whole
CPU), the run sits RUNNING forever with no further step. Ray has no bound for that wait, so the driver keeps
one: :class:`NodeLossGuard` watches the cluster's nodes while ``fit()`` runs, prints a line when one dies,
and when no training step follows within ``scaling.node_loss_timeout_s`` it aborts the run the way Ctrl-C
does (Ray Train's own SIGINT handler stops the controller and its workers) and the run ends with
:class:`NodeLostError`: one line naming the node and how to resume from the checkpoints kept in storage.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from engine.errors import JobError

log = logging.getLogger(__name__)

POLL_S = 2.0
"""How often the driver reads the cluster's node table."""
ABORT_GRACE_S = 15.0
"""After the abort, how long ``fit()`` may take to return before the driver exits on its own (a controller
waiting for a placement group that cannot be placed answers the abort only when that wait ends, 60 s by
default; Ray removes a dead driver's actors and placement groups itself)."""
EXIT_NODE_LOST = 1
JOB_ARGS_ENV = "SHOULDERS_JOB_ARGS"
"""The job file and overrides as the user gave them to ``shoulders train`` or ``shoulders submit`` (which
passes them on to the cluster's driver), for the resume hint."""


class NodeLostError(JobError):
    """A node was lost and the run could not go on without it."""


@dataclass(frozen=True)
class LostNode:
    """A node that was alive when the run started and died during it."""

    node_id: str
    ip: str
    lost_at: float
    """``time.monotonic()`` when the driver saw it dead."""
    step: int | None
    """The last training step the driver had seen then (None: none yet)."""


def alive_nodes(nodes: list[dict[str, Any]]) -> dict[str, str]:
    """``{node id: IP}`` of the alive nodes in ``ray.nodes()``'s table."""
    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes if n.get("Alive")}


def newly_lost(known: dict[str, str], alive: dict[str, str]) -> dict[str, str]:
    """The nodes of ``known`` (``{id: IP}``) that are no longer alive."""
    return {node_id: ip for node_id, ip in known.items() if node_id not in alive}


def should_give_up(lost_at: float | None, last_progress_at: float | None, now: float, timeout_s: float) -> bool:
    """Whether a run that lost a node at ``lost_at`` has waited too long for its next training step: no
    step since the loss and ``timeout_s`` gone by."""
    if lost_at is None:
        return False
    recovered = last_progress_at is not None and last_progress_at > lost_at
    return not recovered and now - lost_at >= timeout_s


def short_id(node_id: str) -> str:
    """The first 12 hex digits of a Ray node id (what ``ray status`` and the dashboard show first)."""
    return node_id[:12]


def lost_line(node: LostNode) -> str:
    """The console line printed when a node dies."""
    where = f"after step {node.step}" if node.step is not None else "before the first step"
    return (f"node {short_id(node.node_id)} ({node.ip}) was lost {where}; Ray Train restarts the workers on the "
            "remaining nodes from the last checkpoint when scaling.max_failures allows")


def resume_hint(job_args: str | None, submitted: bool) -> str:
    """How to resume this job: ``shoulders submit JOB [overrides] --resume`` for a job submitted to a cluster,
    else ``shoulders train JOB [overrides] --resume``; ``job_args`` is the job file and overrides as given."""
    command = "submit" if submitted else "train"
    return f"shoulders {command} {job_args or 'JOB.yaml'} --resume"


def node_lost_message(node: LostNode, waited_s: float, step: int | None, checkpoints: str, resume: str, cause: str | None = None,
                      max_failures: int = 1) -> str:
    """The one line a run that could not recover from a lost node ends with. ``cause``: the error the run
    then failed with (None: the guard gave up waiting); ``max_failures`` 0 adds that recovery was not asked for."""
    progress = f"at step {step}" if step is not None else "before the first step"
    if cause is None:
        why = f"training made no progress in the {waited_s:.0f} s after it (scaling.node_loss_timeout_s): the nodes left cannot run the job"
    else:
        why = f"the run failed {waited_s:.0f} s later without a step on the nodes left ({first_line(cause)})"
    if max_failures == 0:
        why += " (scaling.max_failures is 0: set it to 1 or more to recover from a lost node)"
    return (
        f"node {node.node_id} ({node.ip}) was lost {progress} and {why}; its checkpoints are kept in {checkpoints}: "
        f"once the cluster has the resources again, resume with `{resume}`"
    )


def first_line(text: str, limit: int = 200) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def submitted_job() -> bool:
    """Whether this driver runs as a Ray Jobs API job (``shoulders submit``)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or os.environ.get("RAY_JOB_SUBMISSION_ID"))


def interrupt_main() -> None:
    """Abort ``fit()`` as Ctrl-C does: SIGINT to this process runs Ray Train's handler in the main thread,
    which stops the controller, its workers and their placement group."""
    os.kill(os.getpid(), signal.SIGINT)


class NodeLossGuard:
    """Watches the cluster's nodes while a run trains; see the module docstring.

    ``progress(step)`` is called for every training step the driver hears of (rank 0's console events).
    """

    def __init__(
        self, timeout_s: float, message: Callable[..., str], *,
        nodes: Callable[[], list[dict[str, Any]]] | None = None, abort: Callable[[], None] = interrupt_main,
        say: Callable[[str], None] | None = None, poll_s: float = POLL_S, abort_grace_s: float = ABORT_GRACE_S,
    ):
        self.timeout_s, self.message, self.poll_s, self.abort_grace_s = timeout_s, message, poll_s, abort_grace_s
        if nodes is None:
            import ray

            nodes = ray.nodes
        self.nodes = nodes
        self.abort = abort
        self.say = say or (lambda text: print(text, flush=True))
        self.known = alive_nodes(self.nodes())
        self.lost: LostNode | None = None
        self.step: int | None = None
        self.last_progress_at: float | None = None
        self.gave_up: str | None = None
        """The one-line message once the guard aborted the run."""
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="shoulders-node-loss", daemon=True)

    def progress(self, step: int) -> None:
        """A training step happened (a worker group that came back is progressing)."""
        self.step, self.last_progress_at = step, time.monotonic()

    def waiting(self) -> bool:
        """Whether a node was lost and no training step came after it."""
        return self.lost is not None and not (self.last_progress_at is not None and self.last_progress_at > self.lost.lost_at)

    def on_event(self, event: dict[str, Any]) -> None:
        """Rank 0's console events: ``progress`` and ``eval`` carry a step."""
        step = event.get("step", (event.get("metrics") or {}).get("step"))
        if event.get("event") in ("progress", "eval") and isinstance(step, int):
            self.progress(step)

    def start(self) -> NodeLossGuard:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=self.poll_s + 10)

    def check(self, now: float | None = None) -> None:
        """One look at the node table: record and announce nodes that died; give up when it is time."""
        now = time.monotonic() if now is None else now
        try:
            alive = alive_nodes(self.nodes())
        except Exception as exc:  # noqa: BLE001 - the GCS briefly busy: look again next time
            log.debug("node table unreadable: %s", exc)
            return
        for node_id, ip in newly_lost(self.known, alive).items():
            node = LostNode(node_id, ip, now, self.step)
            self.say(lost_line(node))
            log.info("Ray node %s (%s) died during training", node_id, ip)  # logs/driver.log; the console has the line above
            if self.lost is None or (self.last_progress_at or 0) > self.lost.lost_at:
                self.lost = node  # the loss the run now waits to recover from
        self.known.update(alive)
        for node_id in set(self.known) - set(alive):
            del self.known[node_id]
        if self.gave_up is None and self.lost is not None and should_give_up(self.lost.lost_at, self.last_progress_at, now, self.timeout_s):
            self.gave_up = self.message(self.lost, now - self.lost.lost_at, self.step)
            log.info("giving up: %s", self.gave_up)  # the console gets it once, as the command's error line
            self.abort()

    def _watch(self) -> None:
        while not self.stopping.wait(self.poll_s):
            self.check()
            if self.gave_up is not None:
                break
        if self.gave_up is not None and not self.stopping.wait(self.abort_grace_s):
            # The abort did not end fit() in time: the run must not outlive its verdict.
            print(f"error: {self.gave_up}", file=sys.stderr, flush=True)
            os._exit(EXIT_NODE_LOST)


class Unguarded:
    """What :func:`guard_node_loss` yields where it cannot guard: takes the events, does nothing."""

    def on_event(self, event: dict[str, Any]) -> None:
        pass

    def progress(self, step: int) -> None:
        pass


@contextmanager
def guard_node_loss(timeout_s: float, message: Callable[..., str], **kwargs: Any) -> Iterator[NodeLossGuard | Unguarded]:
    """Run the block (``fit()``) under a :class:`NodeLossGuard`; when the guard aborted it, whatever the abort
    raised (Ray's SIGINT path) becomes :class:`NodeLostError` with the guard's one line. Outside the main
    thread (a Tune trial) nothing can be aborted this way: the block runs unguarded."""
    if threading.current_thread() is not threading.main_thread():
        yield Unguarded()
        return
    guard = NodeLossGuard(timeout_s, message, **kwargs).start()
    try:
        yield guard
    except BaseException as exc:
        if guard.gave_up is not None:
            raise NodeLostError(guard.gave_up) from None
        if guard.waiting() and not isinstance(exc, KeyboardInterrupt):  # Ray gave up first: same line, its reason
            lost = guard.lost
            raise NodeLostError(guard.message(lost, time.monotonic() - lost.lost_at, guard.step, cause=str(exc) or type(exc).__name__)) from exc
        raise
    finally:
        guard.stop()
    if guard.gave_up is not None:  # fit() returned after the abort
        raise NodeLostError(guard.gave_up)
