"""The per-worker training loop: one recipe, readable top to bottom.

setup (seed, model, optimizer, schedule, resume) -> for each batch of the streamed shard: forward,
backward, accumulate, clip, step -> every ``eval.every_n_steps``: evaluate, report metrics and a
checkpoint to Ray Train, early-stop. ``ray.train`` is the only Ray API used here.
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Iterator

import numpy as np
import torch
import ray.train
import ray.train.torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import nn

from engine.backends import Backend, build_backend, partitions_parameters
from engine.backends.ddp import autocast_dtype
from engine.checkpoint import (
    RunFolder, checkpoint_name, next_restart_index, open_latest_complete, restore_checkpoint, save_checkpoint, seed_rngs,
)
from engine.config import JobSpec
from engine.evaluate import in_lockstep, sum_across_workers
from engine.models.prepare import prepare_model
from engine.faults import after_step, audit
from engine.generation import AnswerProbe
from engine.optim import build_param_groups
from engine.packing import length_grouping_window, pack_batch
from engine.perf import ThroughputMeter, apply_perf
from engine.preprocess import SAMPLE_ID, trim_batch
from engine.safeguards import Safeguards
from engine.tasks import get_task
from engine.worker_console import RunEvents

log = logging.getLogger(__name__)
LOG_EVERY_S = 5.0


class Collate(NumpyBatchCollateFn):
    """Trim unused padding (or pack causal-LM rows to ``pack_to`` tokens) and turn numpy columns into
    tensors (on the host, in Ray Data's prefetch thread, which then pins them and copies them to the GPU)."""

    def __init__(self, pack_to: int | None = None, pad_token_id: int = 0):
        self.pack_to, self.pad_token_id = pack_to, pad_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        batch = pack_batch(batch, self.pack_to, self.pad_token_id) if self.pack_to else trim_batch(batch)
        return {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}


collate = Collate()


def text_tokenizer(job: JobSpec) -> Any:
    """The checkpoint's tokenizer of text inputs (speech inputs have none: None)."""
    return get_task(job.model.task).text_tokenizer(job)


def batch_rows(batch: dict[str, torch.Tensor]) -> int:
    """Examples in a batch, whatever its input key (``input_ids``, ``input_values``, ``input_features``)."""
    return int(next(iter(batch.values())).shape[0])


def batch_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens a batch trains on: text's attention-mask sum; for speech, the transcript tokens (ASR) or the clips."""
    if "input_ids" in batch:
        mask = batch.get("attention_mask")
        return mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
    labels = batch.get("labels")
    if labels is not None and labels.ndim == 2:
        return (labels != -100).sum()
    return torch.tensor(batch_rows(batch), device=next(iter(batch.values())).device)


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


class ValidationBatches:
    """This worker's validation batches: streamed from its Ray Data shard on the first pass and kept in
    memory when they take at most ``max_bytes``, so later evaluations skip the Ray Data execution (on 2
    cores that was ~2.5 of the 3.2 s an evaluation of 75 rows took). Iterating yields fresh dicts."""

    def __init__(self, shard: Any, batch_size: int, max_bytes: int):
        self.shard, self.batch_size, self.max_bytes = shard, batch_size, max_bytes
        self.cached: list[dict[str, torch.Tensor]] | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.cached is not None:
            yield from (dict(batch) for batch in self.cached)
            return
        kept: list[dict[str, torch.Tensor]] | None = [] if self.max_bytes > 0 else None
        size = 0
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, collate_fn=collate):
            if kept is not None:
                size += sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
                if size <= self.max_bytes:
                    kept.append(dict(batch))
                else:
                    kept = None
            yield batch
        self.cached = kept


@torch.no_grad()
def evaluate(model: nn.Module, batches: Any, job: JobSpec, num_labels: int | None, device: torch.device, amp_dtype) -> dict[str, float]:
    """One pass over this worker's validation rows (every row is on exactly one worker, see
    ``cluster.data.EveryRowDataConfig``); metrics reduced across workers, ``rows`` counted over all of them."""
    model.eval()
    # DDP: the module itself. DDP's forward broadcasts buffers (the first after a training step), a collective
    # that a worker with fewer or no validation rows would never join: the others would wait forever.
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    task = get_task(job.model.task)
    metrics = task.build_metrics(job, num_labels, device, net, amp_dtype)
    lockstep = partitions_parameters(job)  # ZeRO-3: every forward gathers parameters, so all workers run as many
    uncounted = task.build_metrics(job, num_labels, device, net, amp_dtype) if lockstep else None
    rows = 0
    for batch, counted in in_lockstep(list(batches), device) if lockstep else ((b, True) for b in batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        (metrics if counted else uncounted).update(loss_step(net, batch, amp_dtype, device), batch)
        rows += batch_rows(batch) if counted else 0
    model.train()
    return {**metrics.compute(), "rows": sum_across_workers(rows, device)}


def progress_line(step: int, total: int, loss: float, eta_s: float, width: int = 24) -> str:
    """A log-friendly progress bar: ``step 40/96 [##########--------------]  42%  loss 0.8123  eta 35s``."""
    done = int(width * step / max(total, 1))
    return f"step {step}/{total} [{'#' * done}{'-' * (width - done)}] {100 * step / max(total, 1):3.0f}%  loss {loss:.4f}  eta {eta_s:.0f}s"


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` improves on ``best`` for a metric that is better ``max`` or ``min``."""
    return best is None or (value > best if mode == "max" else value < best)


def run_folder() -> RunFolder:
    """This Train run's folder on its storage (``RunConfig``'s storage path and name), where the
    checkpoints are: resume looks there, so a checkpoint the workers wrote before the driver died counts
    even when Ray Train never registered it (a run restored by Ray always has its latest one there)."""
    storage = ray.train.get_context().get_storage()
    filesystem = storage.storage_filesystem
    return RunFolder(filesystem, storage.experiment_fs_path, lambda path: ray.train.Checkpoint(path, filesystem=filesystem).as_directory())


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
    seed_rngs(job.seed)  # every RNG a model draws from (a resume restores their states from the checkpoint)

    # Model: load -> replace head -> freeze -> adapters; then groups at their LR ratios.
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
    answers = AnswerProbe(config.get("generation_samples"), job, text_tokenizer(job))  # greedy answers at each evaluation
    with guard.param_groups_scope(model):
        groups = build_param_groups(
            model, prepared.head_names, job.finetune.head_lr, job.finetune.backbone_lr_ratio,
            job.finetune.adapter_lr_ratio, job.optim.weight_decay,
        )
    warmup_steps = int(job.optim.warmup_ratio * total_steps)
    # Backend (DDP or DeepSpeed ZeRO): wraps the model; owns optimizer, LR schedule, accumulation, clipping.
    backend = build_backend(job, model, groups, total_steps, warmup_steps, device, world_size)
    eval_every = job.eval.every_n_steps or steps_per_epoch
    generators = {"safeguards": guard.generator}

    # Resume from the newest complete checkpoint: weights, optimizer, schedule, RNG states, data position.
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "restarts": 0, "best": None, "evals_without_improvement": 0, "history": []}
    position: dict[str, Any] = {"sample_ids": []}
    run = run_folder()
    with open_latest_complete(run) as folder:
        if folder is not None:
            saved, position = restore_checkpoint(folder, backend=backend, rank=rank, world_size=world_size, generators=generators)
            state.update(saved["train"], restarts=next_restart_index(run))
            log.info("resumed from step %d (epoch %d, %d batches into it)", state["step"], state["epoch"], state["batches_in_epoch"])
    if guard.unfreeze_due(state["step"]):
        guard.unfreeze(backend.module, state["step"])
        backend.rewrap()

    state["worker_nodes"] = worker_node_ids(world_size)  # where each rank runs; ends up in metrics.json
    train_shard = ray.train.get_dataset_shard("train")
    val_batches = ValidationBatches(
        ray.train.get_dataset_shard("validation"), job.eval.batch_size or 2 * job.optim.batch_size, job.eval.cache_mib * 2**20,
    )
    metric_key = f"val_{job.eval_metric}"
    if rank == 0:
        log.info("training %d steps (%d per epoch) on %d worker(s), eval every %d", total_steps, steps_per_epoch, world_size, eval_every)
    events.send("start", parameters=sum(n for n, _ in parameters), trainable=sum(n for n, grad in parameters if grad),
                total_steps=total_steps, world_size=world_size, eval_every=eval_every, resumed_at=state["step"],
                groups=[{"name": g["name"], "params": sum(p.numel() for p in g["params"]), "lr": g["initial_lr"],
                         "weight_decay": g["weight_decay"]} for g in groups])

    backend.train()
    packing = job.perf.packing and get_task(job.model.task).next_token_loss
    grouped = length_grouping_window(job) is not None  # rows arrive grouped by length: no row shuffle
    train_collate = Collate(job.data.max_length if packing else None, config.get("pad_token_id") or 0)
    meter = ThroughputMeter(model, device, world_size, job.perf.peak_tflops, backend.amp_dtype)
    micro, loss_sum = 0, torch.zeros((), device=device)
    last_log, started = time.perf_counter(), time.perf_counter()
    stop = False
    while not stop and state["step"] < total_steps:
        batches = train_shard.iter_torch_batches(
            batch_size=job.optim.batch_size, collate_fn=train_collate, prefetch_batches=job.perf.prefetch_batches,
            pin_memory=device.type == "cuda",  # Ray's prefetch thread copies pinned batches to the GPU: fast DMA, no staging
            local_shuffle_buffer_size=None if grouped else 4 * job.optim.batch_size, local_shuffle_seed=job.seed + state["epoch"],
        )
        # The epoch's order is deterministic: on resume, skip the batches the checkpoint already trained on.
        for batch in itertools.islice(batches, state["batches_in_epoch"], None):
            ids = batch.pop(SAMPLE_ID, None)
            batch = guard.augment({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            outputs = backend.forward_backward(batch)
            micro += 1
            state["batches_in_epoch"] += 1
            if ids is not None:
                position["sample_ids"].extend(ids.tolist())
            loss_sum += outputs.loss.detach().float()
            meter.add(batch, batch_tokens(batch), job.optim.batch_size if packing else batch_rows(batch))
            if not backend.step():  # accumulating: no optimizer step yet
                continue

            state["step"] += 1
            after_step(config.get("debug"), rank, state["step"])
            if guard.unfreeze_due(state["step"]):  # gradual unfreezing: DDP must see the new trainable set
                guard.unfreeze(backend.module, state["step"])
                backend.rewrap()

            if rank == 0 and time.perf_counter() - last_log > LOG_EVERY_S:
                last_log = time.perf_counter()
                eta = (last_log - started) / state["step"] * (total_steps - state["step"])
                log.info(progress_line(state["step"], total_steps, outputs.loss.item(), eta))
            if events.progress_due(state["step"], total_steps):
                elapsed = time.perf_counter() - started
                events.send("progress", step=state["step"], total=total_steps, loss=outputs.loss.item(),
                            eta=elapsed / state["step"] * (total_steps - state["step"]))

            if state["step"] % eval_every == 0 or state["step"] >= total_steps:
                throughput = meter.read()  # tokens/s, samples/s, MFU, peak memory of this window
                train_loss = (loss_sum / micro).item()
                val = evaluate(backend.model, val_batches, job, len(labels) if labels else None, device, backend.amp_dtype)
                val.update(answers.evaluate(backend.module, state, backend.amp_dtype))
                metrics = {
                    "step": state["step"],
                    "epoch": state["epoch"],
                    "train_loss": train_loss,
                    **{f"val_{k}": v for k, v in val.items()},
                    **throughput,
                    **{f"lr_{name}": lr for name, lr in backend.group_lrs().items()},
                }
                metrics.update(guard.on_eval(backend.module, metrics))
                if is_better(metrics[metric_key], state["best"], job.eval_mode):
                    state["best"], state["evals_without_improvement"] = metrics[metric_key], 0
                else:
                    state["evals_without_improvement"] += 1
                patience = job.eval.early_stopping_patience
                stop = state["step"] >= total_steps or bool(patience and state["evals_without_improvement"] >= patience)
                stop = stop or guard.stop_reason is not None
                if guard.stop_reason and rank == 0:
                    log.info("stopping at step %d: %s", state["step"], guard.stop_reason)
                    events.send("note", text=f"stopping at step {state['step']}: {guard.stop_reason}")
                if stop and state["step"] < total_steps and rank == 0 and not guard.stop_reason:
                    log.info("early stopping at step %d: %s did not improve for %d evaluations", state["step"], metric_key, patience)
                    events.send("note", text=f"early stopping at step {state['step']}: {metric_key} did not improve for {patience} evaluations")
                state["history"].append(metrics)
                report(metrics, backend, state, {**position, **audit(config.get("debug"), backend)}, job, rank, world_size, generators)
                if rank == 0:
                    log.info("eval @ step %d: %s", state["step"], "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("val_")))
                events.send("eval", metrics=metrics)
                micro, loss_sum = 0, torch.zeros((), device=device)
                meter.reset()
            if stop or state["step"] >= total_steps:
                break
        else:
            state["epoch"], state["batches_in_epoch"] = state["epoch"] + 1, 0


def report(
    metrics: dict[str, Any], backend: Backend, state: dict[str, Any], position: dict[str, Any], job: JobSpec,
    rank: int, world_size: int, generators: dict[str, torch.Generator],
) -> None:
    """Report metrics to Ray Train with a checkpoint that every rank writes its part of (Ray merges them)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(
            f"{tmp}/checkpoint", backend=backend, rank=rank, world_size=world_size,
            state={"train": state, "metrics": metrics}, job=job.model_dump(mode="json"),
            rank_state=position, generators=generators,
        )
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(state["step"], state["restarts"]))
