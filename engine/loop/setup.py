"""The loop's setup phase: everything a worker builds before its first batch, and the resume.

:func:`setup` seeds, prepares the model (load -> head -> freeze -> adapters), applies the speed
features, measures the safeguards' references, builds the parameter groups and the backend, and picks
the hooks; :func:`resume` restores the newest complete checkpoint into a :class:`TrainState`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch

from engine.backends import Backend, build_backend, partitions_parameters
from engine.backends.ddp import autocast_dtype
from engine.checkpoints.store import RunFolder, next_restart_index, open_latest_complete, restore_checkpoint, seed_rngs
from engine.config.schema import JobSpec, plan_steps
from engine.evaluation.answers import AnswerProbe
from engine.loop.batches import Collate, ValidationBatches
from engine.loop.worker_output import RunEvents
from engine.loop.hooks import EarlyStopping, FaultInjection, ForgettingLimit, GradualUnfreezing, LoopHook, step_hooks
from engine.loop.optim import build_param_groups
from engine.loop.state import TrainState
from engine.models.prepare import prepare_model
from engine.perf.speed import apply_perf
from engine.preprocessing.packing import length_grouping_window
from engine.safeguards.guards import Safeguards
from engine.tasks import get_task

log = logging.getLogger("engine.loop")


@dataclass
class Worker:
    """What :func:`setup` built for this worker; the loop's phases read it (and change none of it)."""

    job: JobSpec
    rank: int
    world_size: int
    device: torch.device
    num_labels: int | None
    model: torch.nn.Module
    """The prepared model (PEFT or transformers, unwrapped), as the speed features left it."""
    backend: Backend
    guard: Safeguards
    answers: AnswerProbe
    events: RunEvents
    hooks: list[LoopHook]
    step_hooks: list[LoopHook]
    parameters: tuple[int, int]
    """(all, trainable) parameters of the prepared model, counted before the speed features."""
    groups: list[dict[str, Any]]
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    packing: bool
    grouped: bool
    train_shard: Any
    train_collate: Collate
    val_batches: ValidationBatches
    augment: Any = None
    """The task's training augmentation (``Task.train_augmentation``): ``(batch, generator) -> batch``, or None."""


def text_tokenizer(job: JobSpec) -> Any:
    """The checkpoint's tokenizer of text inputs (speech inputs have none: None)."""
    return get_task(job.model.task).text_tokenizer(job)


def setup(config: dict[str, Any]) -> Worker:
    """Build this worker from the Ray Train loop config (``job``, ``labels``, ``num_train_rows``, ...)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    job = JobSpec.model_validate(config["job"])
    labels: list[str] | None = config["labels"]
    rank, world_size = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    amp_dtype = autocast_dtype(job.optim.precision, device)
    seed_rngs(job.seed)  # every RNG a model draws from (a resume restores their states from the checkpoint)

    # Model: load -> replace head -> freeze -> adapters; then the speed features, applied from outside.
    prepared = prepare_model(job, labels, config.get("pad_token_id"))
    model = prepared.model.to(device)
    events = RunEvents((config.get("console") or {}).get("queue"), rank)  # rank 0's lines on the driver's console
    parameters = [(p.numel(), p.requires_grad) for p in model.parameters()]
    # Frozen linears stay plain parameters when gradual unfreezing trains them later or ZeRO-3 partitions them.
    apply_perf(model, job.perf, job.model.task, device, amp_dtype, keep_frozen_weights=bool(
        job.safeguards.unfreeze_every_steps or job.safeguards.unfreeze_every_epochs) or partitions_parameters(job))
    steps_per_epoch, total_steps = plan_steps(job, config["num_train_rows"], world_size)

    # Safeguards: retention set measured on the pre-trained model; gradual unfreezing joins the groups.
    guard = Safeguards(job, model, prepared.stack, prepared.n_frozen, prepared.head_names, steps_per_epoch)
    guard.start(model, config.get("retention_texts"), text_tokenizer(job), device, config.get("drift_texts"))
    answers = AnswerProbe(config.get("answer_samples"), job, text_tokenizer(job))  # greedy answers at each evaluation
    with guard.param_groups_scope(model):
        groups = build_param_groups(
            model, prepared.head_names, job.finetune.head_lr, job.finetune.backbone_lr_ratio,
            job.finetune.adapter_lr_ratio, job.optim.weight_decay,
        )
    # Backend (DDP or DeepSpeed ZeRO): wraps the model; owns optimizer, LR schedule, accumulation, clipping.
    backend = build_backend(job, model, groups, total_steps, int(job.optim.warmup_ratio * total_steps), device, world_size)

    hooks = loop_hooks(job, guard, backend, config.get("faults"), rank, total_steps)
    packing = get_task(job.model.task).packs_rows(job)
    return Worker(
        job=job, rank=rank, world_size=world_size, device=device, num_labels=len(labels) if labels else None, model=model,
        backend=backend, guard=guard, answers=answers, events=events, hooks=hooks, step_hooks=step_hooks(hooks),
        parameters=(sum(n for n, _ in parameters), sum(n for n, grad in parameters if grad)), groups=groups,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, eval_every=job.eval.every_n_steps or steps_per_epoch,
        packing=packing, grouped=length_grouping_window(job) is not None,  # rows arrive grouped by length: no row shuffle
        train_shard=ray.train.get_dataset_shard("train"),
        train_collate=Collate(job.data.max_length if packing else None, config.get("pad_token_id") or 0),
        val_batches=ValidationBatches(
            ray.train.get_dataset_shard("validation"), job.eval.batch_size or 2 * job.optim.batch_size, job.eval.cache_mib * 2**20,
        ),
        augment=get_task(job.model.task).train_augmentation(job),
    )


def loop_hooks(
    job: JobSpec, guard: Safeguards, backend: Backend, faults: dict[str, Any] | None, rank: int, total_steps: int,
) -> list[LoopHook]:
    """The hooks this job needs, in the order they run: faults, gradual unfreezing, forgetting limit, early stopping."""
    hooks: list[LoopHook] = []
    if faults:
        hooks.append(FaultInjection(faults, rank, backend))
    if guard.unfreezer:
        hooks.append(GradualUnfreezing(guard, backend))
    hooks.append(ForgettingLimit(guard))
    hooks.append(EarlyStopping(f"val_{job.eval_metric}", job.eval_mode, job.eval.early_stopping_patience, total_steps))
    return hooks


def run_folder() -> RunFolder:
    """This Train run's folder on its storage (``RunConfig``'s storage path and name), where the
    checkpoints are: resume looks there, so a checkpoint the workers wrote before the driver died counts
    even when Ray Train never registered it (a run restored by Ray always has its latest one there)."""
    storage = ray.train.get_context().get_storage()
    filesystem = storage.storage_filesystem
    return RunFolder(filesystem, storage.experiment_fs_path, lambda path: ray.train.Checkpoint(path, filesystem=filesystem).as_directory())


def resume(worker: Worker) -> TrainState:
    """The train state to start from: the newest complete checkpoint's (weights, optimizer, schedule, RNG
    states and stream position restored), else step 0; then the hooks' ``on_start`` (a resumed run's
    unfreezing depth) and where every rank runs."""
    state = TrainState(generators={"safeguards": worker.guard.generator})
    run = run_folder()
    with open_latest_complete(run) as folder:
        if folder is not None:
            saved, position = restore_checkpoint(
                folder, backend=worker.backend, rank=worker.rank, world_size=worker.world_size, generators=state.generators,
            )
            state.restore(saved["train"], position, restarts=next_restart_index(run))
            log.info("resumed from step %d (epoch %d, %d batches into it)", state.step, state.epoch, state.batches_in_epoch)
    for hook in worker.hooks:
        hook.on_start(state)
    state.worker_nodes = worker_node_ids(worker.world_size)  # where each rank runs; ends up in metrics.json
    return state


def worker_node_ids(world_size: int) -> list[str]:
    """The Ray node id of every worker in rank order (all-gathered), so a run shows where it ran."""
    node_id = ray.get_runtime_context().get_node_id()
    log.info("worker rank %d runs on node %s", ray.train.get_context().get_world_rank(), node_id)
    if world_size == 1 or not torch.distributed.is_initialized():
        return [node_id]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, node_id)
    return [str(n) for n in gathered]
