"""The per-worker training loop: one recipe, readable top to bottom.

setup (seed, model, optimizer, schedule, resume) -> for each batch of the streamed shard: forward,
backward, accumulate, clip, step -> every ``eval.every_n_steps``: evaluate, report metrics and a
checkpoint to Ray Train, early-stop. ``ray.train`` is the only Ray API used here.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import ray.train
import ray.train.torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import nn

from engine.checkpoint import load_trainable_state, read_checkpoint, unwrap, write_checkpoint
from engine.config import JobSpec
from engine.metrics import TaskMetrics
from engine.models.prepare import prepare_model
from engine.optim import build_optimizer, build_param_groups, build_scheduler
from engine.preprocess import cached_tokenizer, trim_batch
from engine.safeguards import Safeguards

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0


class Collate(NumpyBatchCollateFn):
    """Trim unused padding and turn numpy columns into tensors (on the host; moved in the loop)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(v)) for k, v in trim_batch(batch).items()}


collate = Collate()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the job's ``optim.precision`` on ``device`` (None: full fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def plan_steps(job: JobSpec, num_train_rows: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for this job on ``world_size`` workers."""
    rows_per_worker = max(num_train_rows // world_size, 1)
    micro_batches = math.ceil(rows_per_worker / job.optim.batch_size)
    steps_per_epoch = max(micro_batches // job.optim.grad_accum, 1)
    total = job.optim.max_steps or math.ceil(steps_per_epoch * (job.optim.epochs or 1.0))
    return steps_per_epoch, total


def loss_step(model: nn.Module, batch: dict[str, torch.Tensor], amp_dtype: torch.dtype | None, device: torch.device):
    """Forward one micro-batch (under autocast when mixed precision is on) and return the model outputs."""
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with ctx:
        return model(**batch)


@torch.no_grad()
def evaluate(model: nn.Module, shard: Any, job: JobSpec, num_labels: int | None, device: torch.device, amp_dtype) -> dict[str, float]:
    """One pass over this worker's validation shard; metrics reduced across workers."""
    model.eval()
    metrics = TaskMetrics(job.model.task, num_labels, device)
    batch_size = job.eval.batch_size or 2 * job.optim.batch_size
    for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        metrics.update(loss_step(model, batch, amp_dtype, device), batch)
    model.train()
    return metrics.compute()


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` improves on ``best`` for a metric that is better ``max`` or ``min``."""
    return best is None or (value > best if mode == "max" else value < best)


def worker_node_ids(world_size: int) -> list[str]:
    """The Ray node id of every worker in rank order (all-gathered), so a run shows where it ran."""
    node_id = ray.get_runtime_context().get_node_id()
    log.info("worker rank %d runs on node %s", ray.train.get_context().get_world_rank(), node_id)
    if world_size == 1 or not torch.distributed.is_initialized():
        return [node_id]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, node_id)
    return [str(n) for n in gathered]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``job`` (dict), ``labels``, ``num_train_rows``, ``pad_token_id``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    job = JobSpec.model_validate(config["job"])
    labels: list[str] | None = config["labels"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    amp_dtype = autocast_dtype(job.optim.precision, device)

    # Model: load -> replace head -> freeze -> adapters; then groups at their LR ratios.
    prepared = prepare_model(job, labels, config.get("pad_token_id"))
    model = prepared.model.to(device)
    steps_per_epoch, total_steps = plan_steps(job, config["num_train_rows"], world_size)
    # Safeguards: retention set measured on the pre-trained model; gradual unfreezing joins the groups.
    guard = Safeguards(job, model, prepared.stack, prepared.n_frozen, prepared.head_names, steps_per_epoch)
    guard.start(model, config.get("retention_texts"), cached_tokenizer(job.model.name, job.model.revision), device)
    with guard.param_groups_scope(model):
        groups = build_param_groups(
            model, prepared.head_names, job.finetune.head_lr, job.finetune.backbone_lr_ratio,
            job.finetune.adapter_lr_ratio, job.optim.weight_decay,
        )
    optimizer = build_optimizer(groups, job.optim.betas, device)
    warmup_steps = int(job.optim.warmup_ratio * total_steps)
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, job.optim.schedule)
    eval_every = job.eval.every_n_steps or steps_per_epoch
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    state = {"step": 0, "epoch": 0, "best": None, "evals_without_improvement": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = read_checkpoint(folder)
        load_trainable_state(model, saved["weights"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(saved["state"]["train"])
        scheduler.load_state_dict(saved["state"]["scheduler"])
        log.info("resumed from step %d", state["step"])
    if guard.unfreeze_due(state["step"]):
        guard.unfreeze(model, state["step"])

    state["worker_nodes"] = worker_node_ids(world_size)  # where each rank runs; ends up in metrics.json
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    metric_key = f"val_{job.eval_metric}"
    if rank == 0:
        log.info("training %d steps (%d per epoch) on %d worker(s), eval every %d", total_steps, steps_per_epoch, world_size, eval_every)

    model.train()
    micro, loss_sum, samples, tokens = 0, torch.zeros((), device=device), 0, torch.zeros((), device=device)
    window_start, last_log, started = time.perf_counter(), time.perf_counter(), time.perf_counter()
    stop = False
    while not stop and state["step"] < total_steps:
        batches = train_shard.iter_torch_batches(
            batch_size=job.optim.batch_size, collate_fn=collate,
            local_shuffle_buffer_size=4 * job.optim.batch_size, local_shuffle_seed=job.seed + state["epoch"],
        )
        for batch in batches:
            batch = guard.augment({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            micro += 1
            sync = micro % job.optim.grad_accum == 0
            with (nullcontext() if sync or world_size == 1 else model.no_sync()):
                outputs = loss_step(model, batch, amp_dtype, device)
                scaler.scale(outputs.loss / job.optim.grad_accum).backward()
            loss_sum += outputs.loss.detach().float()
            samples += batch["input_ids"].shape[0]
            tokens += batch["attention_mask"].sum()
            if not sync:
                continue

            if job.optim.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            if guard.unfreeze_due(state["step"]):  # gradual unfreezing: DDP must see the new trainable set
                model = ray.train.torch.prepare_model(guard.unfreeze(unwrap(model), state["step"]), move_to_device=False)

            if rank == 0 and time.perf_counter() - last_log > LOG_EVERY_S:
                last_log = time.perf_counter()
                eta = (last_log - started) / state["step"] * (total_steps - state["step"])
                log.info("step %d/%d  loss %.4f  eta %ds", state["step"], total_steps, outputs.loss.item(), eta)

            if state["step"] % eval_every == 0 or state["step"] >= total_steps:
                elapsed = time.perf_counter() - window_start
                train_loss = (loss_sum / micro).item()
                val = evaluate(model, val_shard, job, len(labels) if labels else None, device, amp_dtype)
                metrics = {
                    "step": state["step"],
                    "epoch": state["epoch"],
                    "train_loss": train_loss,
                    **{f"val_{k}": v for k, v in val.items()},
                    "samples_per_s": samples * world_size / elapsed,
                    "tokens_per_s": tokens.item() * world_size / elapsed,
                    "lr_head": optimizer.param_groups[0]["lr"],
                }
                metrics.update(guard.on_eval(unwrap(model), metrics))
                if is_better(metrics[metric_key], state["best"], job.eval_mode):
                    state["best"], state["evals_without_improvement"] = metrics[metric_key], 0
                else:
                    state["evals_without_improvement"] += 1
                patience = job.eval.early_stopping_patience
                stop = state["step"] >= total_steps or bool(patience and state["evals_without_improvement"] >= patience)
                stop = stop or guard.stop_reason is not None
                if guard.stop_reason and rank == 0:
                    log.info("stopping at step %d: %s", state["step"], guard.stop_reason)
                if stop and state["step"] < total_steps and rank == 0:
                    log.info("early stopping at step %d: %s did not improve for %d evaluations", state["step"], metric_key, patience)
                state["history"].append(metrics)
                report(metrics, model, optimizer, scheduler, state, job, rank)
                if rank == 0:
                    log.info("eval @ step %d: %s", state["step"], "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("val_")))
                micro, loss_sum, samples, tokens = 0, torch.zeros((), device=device), 0, torch.zeros((), device=device)
                window_start = time.perf_counter()
            if stop or state["step"] >= total_steps:
                break
        state["epoch"] += 1


def report(metrics: dict[str, Any], model, optimizer, scheduler, state: dict[str, Any], job: JobSpec, rank: int) -> None:
    """Report metrics to Ray Train with a checkpoint written by rank 0 (other ranks report metrics only)."""
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(
            f"{tmp}/checkpoint",
            model=unwrap(model),
            optimizer=optimizer,
            state={"train": state, "scheduler": scheduler.state_dict(), "metrics": metrics},
            job=job.model_dump(mode="json"),
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
