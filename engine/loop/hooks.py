"""What the loop calls at fixed points, apart from the recipe itself: gradual unfreezing, fault
injection, the forgetting limit and early stopping.

A hook overrides any of four methods (each does nothing by default): ``on_start`` once after setup and
resume, ``after_step`` after each optimizer step, ``after_eval`` after each evaluation (returns the reason
to stop, worded for the console, or None) and ``checkpoint_extras`` (entries for this rank's
``position.json``). Only hooks that override ``after_step`` are called per step (:func:`step_hooks`), so
a job without gradual unfreezing or fault injection pays nothing per step.
"""

from __future__ import annotations

from typing import Any

from engine.backends import Backend
from engine.loop import faults
from engine.loop.state import TrainState
from engine.safeguards.guards import Safeguards


class LoopHook:
    """A hook the loop calls; every method does nothing unless overridden."""

    def on_start(self, state: TrainState) -> None:
        """Once, after setup and resume, before the first batch."""

    def after_step(self, state: TrainState) -> None:
        """After optimizer step ``state.step``."""

    def after_eval(self, state: TrainState, metrics: dict[str, Any]) -> str | None:
        """After an evaluation's metrics are complete: a reason to stop training, or None."""
        return None

    def checkpoint_extras(self) -> dict[str, Any]:
        """Entries for this rank's ``position.json`` in the checkpoint about to be written (every rank calls it)."""
        return {}


def step_hooks(hooks: list[LoopHook]) -> list[LoopHook]:
    """The hooks with an ``after_step`` of their own (the others are not called per step)."""
    return [hook for hook in hooks if type(hook).after_step is not LoopHook.after_step]


class GradualUnfreezing(LoopHook):
    """One more block unfreezes every k steps (``safeguards.unfreeze_every_*``); the backend re-wraps the
    model so DDP sees the new trainable set. On start, a resumed run gets the depth of its step."""

    def __init__(self, guard: Safeguards, backend: Backend):
        self.guard, self.backend = guard, backend

    def _apply(self, step: int) -> None:
        if self.guard.unfreeze_due(step):
            self.guard.unfreeze(self.backend.module, step)
            self.backend.rewrap()

    def on_start(self, state: TrainState) -> None:
        """Unfreeze what the schedule had unfrozen by a resumed step."""
        self._apply(state.step)

    def after_step(self, state: TrainState) -> None:
        """Unfreeze the next block when the schedule says so."""
        self._apply(state.step)


class FaultInjection(LoopHook):
    """``SHOULDERS_FAULTS``'s faults (:mod:`engine.loop.faults`): kill or slow a worker after a step, and record
    a digest of the frozen weights in every checkpoint."""

    def __init__(self, settings: dict[str, Any], rank: int, backend: Backend):
        self.settings, self.rank, self.backend = settings, rank, backend

    def after_step(self, state: TrainState) -> None:
        """Sleep or kill this worker, as the settings ask."""
        faults.inject_step_faults(self.settings, self.rank, state.step)

    def checkpoint_extras(self) -> dict[str, Any]:
        """The frozen weights' digest, when asked for (a collective under ZeRO-3)."""
        return faults.audit(self.settings, self.backend)


class ForgettingLimit(LoopHook):
    """Stops the run when the safeguards' forgetting (or drift) passed ``safeguards.max_forgetting``
    (measured by :meth:`Safeguards.on_eval`, which the evaluation calls)."""

    def __init__(self, guard: Safeguards):
        self.guard = guard

    def after_eval(self, state: TrainState, metrics: dict[str, Any]) -> str | None:
        """The safeguards' stop reason, if any."""
        return f"stopping at step {state.step}: {self.guard.stop_reason}" if self.guard.stop_reason else None


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` improves on ``best`` for a metric that is better ``max`` or ``min``."""
    return best is None or (value > best if mode == "max" else value < best)


class EarlyStopping(LoopHook):
    """Tracks the best ``metric_key`` in the train state and stops after ``patience`` evaluations without
    improvement (never when ``patience`` is unset, nor at the last step, which stops anyway)."""

    def __init__(self, metric_key: str, mode: str, patience: int | None, total_steps: int):
        self.metric_key, self.mode, self.patience, self.total_steps = metric_key, mode, patience, total_steps

    def after_eval(self, state: TrainState, metrics: dict[str, Any]) -> str | None:
        """Update ``best`` / ``evals_without_improvement``; the reason to stop early, if any."""
        if is_better(metrics[self.metric_key], state.best, self.mode):
            state.best, state.evals_without_improvement = metrics[self.metric_key], 0
        else:
            state.evals_without_improvement += 1
        if self.patience and state.evals_without_improvement >= self.patience and state.step < self.total_steps:
            return (f"early stopping at step {state.step}: {self.metric_key} did not improve for "
                    f"{self.patience} evaluations")
        return None
