"""The loop's typed train state and its hooks: the on-disk keys stay what resume, Tune and the driver read,
a save/restore round trip is exact, and early stopping / the per-step hook selection behave as the loop expects."""

from __future__ import annotations

import json

from engine.loop.hooks import EarlyStopping, ForgettingLimit, GradualUnfreezing, LoopHook, step_hooks
from engine.loop.state import TrainState

SHARED_KEYS = ["step", "epoch", "batches_in_epoch", "restarts", "best", "evals_without_improvement", "history", "worker_nodes"]


def test_state_json_keeps_its_keys_in_order():
    assert list(TrainState().shared()) == SHARED_KEYS
    assert list(TrainState(answers=[{"step": 1}]).shared()) == [*SHARED_KEYS, "answers"]
    assert TrainState(sample_ids=[3, 1]).rank_position({"frozen_digest": "x"}) == {"sample_ids": [3, 1], "frozen_digest": "x"}


def test_restore_round_trips_through_json():
    saved = TrainState(step=6, epoch=1, batches_in_epoch=2, restarts=0, best=0.5, evals_without_improvement=1,
                       history=[{"step": 6, "val_loss": 0.5}], worker_nodes=["a"], answers=[{"step": 6}], sample_ids=[4, 2])
    shared = json.loads(json.dumps(saved.shared()))
    position = json.loads(json.dumps(saved.rank_position()))
    restored = TrainState()
    restored.restore(shared, position, restarts=2)
    assert restored.shared() == {**saved.shared(), "restarts": 2}
    assert restored.sample_ids == [4, 2]


def test_early_stopping_tracks_the_best_and_stops_after_patience():
    hook = EarlyStopping("val_accuracy", "max", patience=2, total_steps=10)
    state = TrainState()
    reasons = []
    for step, value in enumerate([0.5, 0.6, 0.6, 0.55], start=1):
        state.step = step
        reasons.append(hook.after_eval(state, {"val_accuracy": value}))
    assert state.best == 0.6 and state.evals_without_improvement == 2
    assert reasons[:3] == [None, None, None] and "did not improve for 2 evaluations" in reasons[3]
    state.step = 10  # the last step stops anyway: no early-stopping note
    assert hook.after_eval(state, {"val_accuracy": 0.1}) is None
    assert EarlyStopping("val_loss", "min", None, 10).after_eval(TrainState(step=1), {"val_loss": 1.0}) is None


def test_only_hooks_with_a_step_action_run_per_step():
    class Guard:
        stop_reason = None

    hooks = [ForgettingLimit(Guard()), EarlyStopping("val_loss", "min", None, 4), GradualUnfreezing(Guard(), None)]
    assert [type(h) for h in step_hooks(hooks)] == [GradualUnfreezing]
    assert step_hooks([LoopHook()]) == []
