"""The per-worker training loop: one recipe, read top to bottom.

:func:`train_loop_per_worker` is the whole loop; each phase is a small function below it:
setup and resume (:mod:`engine.loop.setup`) -> :func:`start` -> for each batch of the streamed shard:
:func:`train_step` (forward, backward, accumulate, clip, step) -> :func:`finish_step` (per-step hooks, progress)
-> every ``eval.every_n_steps``: :func:`evaluate_and_report` (metrics, :func:`stop_reason`, checkpoint
and report to Ray Train). ``ray.train`` is the only Ray API the loop uses.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import numpy as np
import ray.train
import torch

from engine.checkpoints.store import checkpoint_name, save_checkpoint
from engine.loop.batches import batch_rows, batch_tokens, epoch_batches
from engine.loop.evaluation import evaluate
from engine.loop.setup import Worker, resume, setup
from engine.loop.state import TrainState
from engine.loop.window import TrainWindow
from engine.perf.speed import ThroughputMeter
from engine.preprocessing.text import SAMPLE_ID

log = logging.getLogger("engine.loop")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``job`` (dict), ``labels``, ``num_train_rows``, ``pad_token_id``, ..."""
    worker = setup(config)  # seed, model, speed features, safeguards, parameter groups, backend, hooks, shards
    state = resume(worker)  # the newest complete checkpoint: weights, optimizer, RNG states, stream position
    window = start(worker, state)
    stop = False
    while not stop and state.step < worker.total_steps:
        for batch in epoch_batches(worker.train_shard, worker.job, state, worker.train_collate, worker.device, worker.grouped):
            if not train_step(worker, state, window, batch):
                continue  # accumulating: no optimizer step yet
            finish_step(worker, state, window)
            if state.step % worker.eval_every == 0 or state.step >= worker.total_steps:
                stop = evaluate_and_report(worker, state, window)
            if stop or state.step >= worker.total_steps:
                break
        else:
            state.next_epoch()


def start(worker: Worker, state: TrainState) -> TrainWindow:
    """Announce the run (log line, console event) and open the first measurement window."""
    if worker.rank == 0:
        log.info("training %d steps (%d per epoch) on %d worker(s), eval every %d",
                 worker.total_steps, worker.steps_per_epoch, worker.world_size, worker.eval_every)
    worker.events.send(
        "start", parameters=worker.parameters[0], trainable=worker.parameters[1], total_steps=worker.total_steps,
        world_size=worker.world_size, eval_every=worker.eval_every, resumed_at=state.step,
        groups=[{"name": g["name"], "params": sum(p.numel() for p in g["params"]), "lr": g["initial_lr"],
                 "weight_decay": g["weight_decay"]} for g in worker.groups],
    )
    worker.backend.train()
    meter = ThroughputMeter(worker.model, worker.device, worker.world_size, worker.job.perf.peak_tflops, worker.backend.amp_dtype)
    return TrainWindow(meter, worker.device, worker.rank, worker.total_steps, worker.events)


def train_step(worker: Worker, state: TrainState, window: TrainWindow, batch: dict[str, torch.Tensor]) -> bool:
    """Forward and backward one micro-batch (the backend accumulates, clips and steps); True when it
    completed an optimizer step. Nothing here waits for the device."""
    ids = batch.pop(SAMPLE_ID, None)
    if worker.augment is not None:  # seeded by the batch's place in the stream: a resume draws the same
        batch = augment_batch(worker, state, batch)
    batch = worker.guard.augment({k: v.to(worker.device, non_blocking=True) for k, v in batch.items()})
    outputs = worker.backend.forward_backward(batch)
    state.batches_in_epoch += 1
    if ids is not None:
        state.sample_ids.extend(ids.tolist())
    window.add(outputs.loss)
    window.meter.add(batch, batch_tokens(batch), worker.job.optim.batch_size if worker.packing else batch_rows(batch))
    if not worker.backend.step():
        return False
    state.step += 1
    return True


def augment_batch(worker: Worker, state: TrainState, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The task's training augmentation of one host batch, its generator seeded from the job's seed, the rank,
    the epoch and the batch's index in it (the epoch's order is deterministic, so so are the draws)."""
    rng = np.random.default_rng([worker.job.seed, worker.rank, state.epoch, state.batches_in_epoch])
    out = worker.augment({k: v.numpy() for k, v in batch.items()}, rng)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def finish_step(worker: Worker, state: TrainState, window: TrainWindow) -> None:
    """After an optimizer step: the per-step hooks (faults, gradual unfreezing), then the progress line."""
    for hook in worker.step_hooks:
        hook.after_step(state)
    window.show_progress(state.step)


def evaluate_and_report(worker: Worker, state: TrainState, window: TrainWindow) -> bool:
    """Evaluate, let the hooks decide whether to stop, then checkpoint and report to Ray Train; returns
    whether training stops (the last step, or a hook's reason)."""
    metrics = evaluation_metrics(worker, state, window)
    reason = stop_reason(worker, state, metrics)
    if reason and worker.rank == 0:
        log.info(reason)
        worker.events.send("note", text=reason)
    state.history.append(metrics)
    report(worker, state, metrics)
    if worker.rank == 0:
        log.info("eval @ step %d: %s", state.step, "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("val_")))
    worker.events.send("eval", metrics=metrics)
    window.reset()
    return state.step >= worker.total_steps or reason is not None


def stop_reason(worker: Worker, state: TrainState, metrics: dict[str, Any]) -> str | None:
    """Why training stops before its last step (the forgetting limit, early stopping), or None. Every hook
    sees every evaluation (early stopping keeps the best metric in the state); the first reason wins."""
    reasons = [hook.after_eval(state, metrics) for hook in worker.hooks]
    return next((reason for reason in reasons if reason), None)


def evaluation_metrics(worker: Worker, state: TrainState, window: TrainWindow) -> dict[str, Any]:
    """This evaluation's metrics: the window's train loss and throughput, validation metrics (and greedy
    answers' scores), each group's LR, and the safeguards' measures."""
    backend = worker.backend
    throughput = window.meter.read()  # tokens/s, samples/s, MFU, peak memory of this window
    train_loss = window.mean_loss()
    val = evaluate(backend.model, worker.val_batches, worker.job, worker.num_labels, worker.device, backend.amp_dtype)
    val.update(worker.answers.evaluate(backend.module, state.step, state.answers, backend.amp_dtype))
    metrics = {
        "step": state.step,
        "epoch": state.epoch,
        "train_loss": train_loss,
        **{f"val_{k}": v for k, v in val.items()},
        **throughput,
        **{f"lr_{name}": lr for name, lr in backend.group_lrs().items()},
    }
    metrics.update(worker.guard.on_eval(backend.module, metrics))
    return metrics


def report(worker: Worker, state: TrainState, metrics: dict[str, Any]) -> None:
    """Report metrics to Ray Train with a checkpoint that every rank writes its part of (Ray merges them)."""
    extras: dict[str, Any] = {}
    for hook in worker.hooks:
        extras.update(hook.checkpoint_extras())
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(
            f"{tmp}/checkpoint", backend=worker.backend, rank=worker.rank, world_size=worker.world_size,
            state={"train": state.shared(), "metrics": metrics}, job=worker.job.model_dump(mode="json"),
            rank_state=state.rank_position(extras), generators=state.generators,
        )
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(state.step, state.restarts))
