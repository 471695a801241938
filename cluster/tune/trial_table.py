"""A search on the console: a compact table of trials that grows by one row as each trial ends, instead of
Ray Tune's status boxes (``RunConfig(verbose=0)``; ``--verbose`` brings them back)."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from ray.tune import Callback

from cluster.run.console import format_duration, is_verbose


def tune_verbosity() -> int:
    """Ray Tune's own status output: none, unless ``--verbose``. (Tune's newer output prints its
    configuration box and result paths even at ``verbose=0``; its classic reporter, chosen by
    ``RAY_AIR_NEW_OUTPUT=0``, prints nothing at 0.)"""
    if is_verbose():
        return 1
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    return 0


def override_text(overrides: dict[str, Any]) -> str:
    """``freeze_depth=2 backbone_lr_ratio=0.1`` (the last part of each dotted key, numbers shortened)."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value:.3g}" if isinstance(value, float) else f"{key.rsplit('.', 1)[-1]}={value}"
                    for key, value in overrides.items())


class TrialTable(Callback):
    """Prints a header when the first trial starts and one row per trial as it ends: trial id, how it ended
    (done, stopped early by the scheduler, error), evaluations, last step, best and last metric, time, and
    the values it tried."""

    def __init__(self, metric: str, mode: str, planned_steps: int, stream: TextIO | None = None):
        self.metric, self.mode, self.planned = metric, mode, planned_steps
        self.stream = stream  # None: sys.stdout when printing (Tune pickles its callbacks; a captured stdout cannot be)
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.header_shown = False

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self.header_shown:
            self.header_shown = True
            self._print(f"{'trial':<12} {'ended':<13} {'evals':>5} {'step':>6} {'best ' + self.metric:>18} {'last':>8} {'time':>7}  values")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        self.results.setdefault(trial.trial_id, []).append(result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(self.row(trial.trial_id, trial.config.get("overrides", {}), self.results.get(trial.trial_id, []), None))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(self.row(trial.trial_id, trial.config.get("overrides", {}), self.results.get(trial.trial_id, []), "error"))

    def row(self, trial_id: str, overrides: dict[str, Any], results: list[dict[str, Any]], failed: str | None) -> str:
        """One finished trial's row."""
        scored = [r[self.metric] for r in results if isinstance(r.get(self.metric), (int, float))]
        best = (max if self.mode == "max" else min)(scored) if scored else None
        last_step = int(results[-1].get("step", 0)) if results else 0
        ended = failed or ("done" if last_step >= self.planned else "stopped early")
        elapsed = results[-1].get("time_total_s") if results else None
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        return (f"{trial_id:<12} {ended:<13} {len(results):>5} {last_step:>6} {fmt(best):>18} {fmt(scored[-1] if scored else None):>8} "
                f"{format_duration(elapsed) if elapsed else '-':>7}  {override_text(overrides)}")
