"""One engine case, in its own process: ``ray`` runs the job exactly as ``shoulders train`` does (preflight,
Ray Data read + tokenize + stream, TorchTrainer, the engine's loop); ``plain`` runs the same model, perf
settings, optimizer and step on the same tokenized batches in a bare loop without Ray (the Ray-overhead
reference, the FP8-vs-bf16 loss parity check and the profile).

    python -m benchmarks.run_engine --mode ray|plain|whisper_full|w2v2_ctc --job job.json --out result.json [--warm 4] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def steady_window(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the reports after the first (warm-up) window: tokens over time, not a mean of rates."""
    steady = history[1:] or history
    seconds = sum(h["window_s"] for h in steady)
    out: dict[str, Any] = {
        "tokens_per_s": sum(h["tokens_per_s"] * h["window_s"] for h in steady) / seconds,
        "samples_per_s": sum(h["samples_per_s"] * h["window_s"] for h in steady) / seconds,
        "steady_s": seconds,
        "train_loss": [h["train_loss"] for h in history],
    }
    if all("mfu_pct" in h for h in steady):
        out["mfu_pct"] = sum(h["mfu_pct"] * h["window_s"] for h in steady) / seconds
    mems = [h["peak_mem_gib"] for h in history if "peak_mem_gib" in h]
    if mems:
        out["peak_mem_gib"] = max(mems)
    return out


def run_ray(job_dict: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """The job through ``preflight`` and ``run_training``, the code path of ``shoulders train``."""
    import ray

    from cluster.preflight.job import preflight
    from cluster.run.trainer import EMBEDDED_TRAIN_ENV, run_training
    from engine.config.schema import build_job

    os.environ.update(EMBEDDED_TRAIN_ENV)  # as shoulders' own embedded Ray runs
    t0 = time.perf_counter()
    ray.init(num_cpus=max(os.cpu_count() or 2, 4), num_gpus=1 if gpu else 0, include_dashboard=False, configure_logging=False)
    ray_init_s = time.perf_counter() - t0
    try:
        job, info = preflight(build_job(job_dict, "benchmark"))
        t1 = time.perf_counter()
        summary = run_training(job, info)
        wall = time.perf_counter() - t1
    finally:
        ray.shutdown()
    out = steady_window(summary.history)
    out.update(ray_init_s=round(ray_init_s, 1), fit_wall_s=round(wall, 1), windows=len(summary.history), ray=ray.__version__)
    return out


def tokenized_batches(job: Any, rows: int) -> list[dict[str, Any]]:
    """The job's training rows tokenized and collated exactly as the Ray path does, in micro-batches."""
    import pyarrow.parquet as pq

    from engine.loop.batches import Collate
    from engine.preprocessing.chat import encode_conversations, layout_columns
    from engine.preprocessing.text import cached_tokenizer, tokenize_batch

    tokenizer = cached_tokenizer(job.model.name, job.model.revision)
    columns = layout_columns(job.data)  # text, or instruction data (data.layout chat / prompt_completion)
    table = pq.read_table(job.data.train, columns=list(columns.values())).slice(0, rows)
    values = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns.values()}
    from engine.tasks import get_task

    task = get_task(job.model.task)
    lm, packing = task.next_token_loss, task.packs_rows(job)
    collate = Collate(job.data.max_length if packing else None, tokenizer.pad_token_id or 0)
    bs = job.optim.batch_size
    out = []
    for i in range(0, table.num_rows - bs + 1, bs):
        batch = {c: v[i : i + bs] for c, v in values.items()}
        if job.data.layout == "text":
            encoded = tokenize_batch(batch, tokenizer=tokenizer, lm_labels=lm, text_column=job.data.text_column,
                                     max_length=job.data.max_length)
        else:  # as cluster.ingest.datasets's preprocess: the chat template, labels on the answers only
            encoded = encode_conversations(batch, tokenizer=tokenizer, layout=job.data.layout, columns=columns,
                                           max_length=job.data.max_length, system_prompt=job.data.system_prompt,
                                           chat_template=job.data.chat_template)
        out.append(collate(encoded))
    return out


def profile_steps(step, batches: list[dict[str, Any]], n: int = 2, top: int = 18) -> dict[str, Any]:
    """Kernel time by name over ``n`` steps, and shares by kind (matmul, attention, Triton, other)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(batches[i % len(batches)])
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    rows = []
    for evt in prof.key_averages():
        # Kernels only: an operator's "self device time" repeats its kernels' time (counted twice otherwise).
        if getattr(evt, "device_type", None) != DeviceType.CUDA:
            continue
        t = getattr(evt, "self_device_time_total", None)
        t = getattr(evt, "self_cuda_time_total", 0) if t is None else t
        if t > 0 and evt.key:
            rows.append((evt.key, t / 1000.0 / n, evt.count // n))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    kinds = {"attention": ("flash", "fmha", "attention", "sdpa"), "convolution": ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm"),
             "matmul": ("gemm", "nvjet", "cutlass", "xmma", "cublas"), "optimizer": ("adam", "multi_tensor"),
             "normalization": ("layer_norm", "group_norm", "layernorm", "norm_"),
             "triton (Liger, FP8 quantize, compiled)": ("triton", "liger", "quantize", "_kernel")}
    share: dict[str, float] = {k: 0.0 for k in [*kinds, "other"]}
    for name, ms, _ in rows:
        kind = next((k for k, keys in kinds.items() if any(key in name.lower() for key in keys)), "other")
        share[kind] += ms
    return {
        "gpu_ms_per_step": round(total, 2),
        "ms_per_step_by_kind": {k: round(v, 2) for k, v in share.items()},
        "top_kernels": [{"name": name[:120], "ms_per_step": round(ms, 3), "calls_per_step": calls} for name, ms, calls in rows[:top]],
    }


def run_plain(job_dict: dict[str, Any], warm: int, steps: int, profile: bool) -> dict[str, Any]:
    """The same model, perf settings, backend (optimizer, autocast, clipping) and step as the engine's loop,
    without Ray: no Ray Data, no Ray Train worker, batches tokenized up front."""
    import torch

    from cluster.preflight.job import with_absolute_paths
    from engine.backends import build_backend
    from engine.backends.ddp import autocast_dtype
    from engine.config.schema import build_job
    from engine.loop.optim import build_param_groups
    from engine.models.prepare import prepare_model
    from engine.perf.speed import ThroughputMeter, apply_perf
    from engine.preprocessing.text import cached_tokenizer

    job = with_absolute_paths(build_job(job_dict, "benchmark"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = autocast_dtype(job.optim.precision, device)
    prepared = prepare_model(job, None, cached_tokenizer(job.model.name, job.model.revision).pad_token_id)
    model = prepared.model.to(device)
    plan = apply_perf(model, job.perf, job.model.task, device, amp_dtype)
    groups = build_param_groups(model, prepared.head_names, job.finetune.head_lr, job.finetune.backbone_lr_ratio,
                                job.finetune.adapter_lr_ratio, job.optim.weight_decay)
    # The loop's own backend (DDP on one worker = the bare model): same autocast, clipping, optimizer, schedule.
    backend = build_backend(job, model, groups, warm + steps, 0, device, 1)
    batches = tokenized_batches(job, job.optim.batch_size * (warm + steps))
    backend.train()
    losses: list[torch.Tensor] = []

    def step(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        outputs = backend.forward_backward(batch)
        backend.step()
        losses.append(outputs.loss.detach().float())
        return batch

    meter = ThroughputMeter(model, device, 1, job.perf.peak_tflops, backend.amp_dtype)
    for i in range(warm + steps):
        if i == warm:
            meter.reset()
        batch = step(batches[i % len(batches)])
        if i >= warm:
            meter.add(batch)
    out: dict[str, Any] = meter.read()
    out["train_loss"] = [round(float(x), 5) for x in torch.stack(losses).cpu()]
    if "labels" in batches[0]:  # the share of the real tokens that are targets (answer-only labels: below 1)
        targets = sum(int((b["labels"] != -100).sum()) for b in batches)
        real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)  # packed: no padding
        out["target_token_share"] = round(targets / real, 4)
    out["perf_plan"] = {k: v for k, v in plan.__dict__.items()}
    if profile and device.type == "cuda":
        out["profile"] = profile_steps(step, batches)
    return out


def run_speech(kind: str, tiny: bool, warm: int, steps: int, perf: dict[str, Any], profile: bool = False) -> dict[str, Any]:
    """The engine's step (``apply_perf`` + the loop's backend: autocast, fused AdamW, clipping, schedule) on
    the peer's speech shapes, full fine-tune, random batches as the peer draws them. Model loading and the
    Ray Data audio path are not in this row (they do not run per step). ``profile``: the kernel profile of
    two more steps (on a GPU)."""
    import torch

    from benchmarks.workload import speech_model
    from engine.backends import build_backend
    from engine.config.schema import build_job
    from engine.loop.optim import build_param_groups
    from engine.perf.speed import ThroughputMeter, apply_perf

    task = "speech_seq2seq" if kind == "whisper_full" else "ctc"
    job = build_job({"model": {"name": f"bench-{kind}", "task": task}, "data": {"train": "random"},
                     "finetune": {"strategy": "full", "head_lr": 1e-5, "backbone_lr_ratio": 1.0},
                     "optim": {"precision": "auto", "max_steps": warm + steps, "warmup_ratio": 0.0}, "perf": perf}, "benchmark")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, batch_size, shapes = speech_model(kind, tiny)
    model.to(device)
    from engine.backends.ddp import autocast_dtype

    plan = apply_perf(model, job.perf, task, device, autocast_dtype(job.optim.precision, device))
    groups = build_param_groups(model, [], job.finetune.head_lr, job.finetune.backbone_lr_ratio, job.finetune.adapter_lr_ratio, job.optim.weight_decay)
    backend = build_backend(job, model, groups, warm + steps, 0, device, 1)
    backend.train()

    def draw() -> dict[str, torch.Tensor]:
        out = {}
        for key, shape in shapes.items():
            if key == "labels":
                out[key] = torch.randint(1, shape[2], shape[:2], device=device)
            else:
                out[key] = torch.randn(*shape, device=device)
        return out

    meter = ThroughputMeter(model, device, 1, job.perf.peak_tflops, backend.amp_dtype)
    losses = []

    def step(batch: dict[str, torch.Tensor]) -> None:
        outputs = backend.forward_backward(batch)
        backend.step()
        losses.append(outputs.loss.detach().float())

    for i in range(warm + steps):
        if i == warm:
            meter.reset()
        batch = draw()
        step(batch)
        if i >= warm:
            meter.add(batch, samples=batch_size)
    out = meter.read()
    out.pop("tokens_per_s", None)
    out.update(train_loss=[round(float(x), 4) for x in torch.stack(losses).cpu()], perf_plan=dict(plan.__dict__), batch=batch_size)
    if profile and device.type == "cuda":
        out["profile"] = profile_steps(step, [draw(), draw()])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["ray", "plain", "whisper_full", "w2v2_ctc"], required=True)
    parser.add_argument("--job", required=True, help="job JSON (as written by benchmarks.bench); speech modes read only its perf")
    parser.add_argument("--tiny", action="store_true", help="speech modes: tiny shapes")
    parser.add_argument("--out", required=True)
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    import torch

    job_dict = json.loads(Path(args.job).read_text())
    gpu = torch.cuda.is_available()
    t0 = time.perf_counter()
    if args.mode == "ray":
        result = run_ray(job_dict, gpu)
    elif args.mode == "plain":
        result = run_plain(job_dict, args.warm, args.steps, args.profile)
    else:
        result = run_speech(args.mode, args.tiny, args.warm, args.steps, job_dict.get("perf", {}), args.profile)
    result["case_wall_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("ENGINE_RESULT " + json.dumps({k: v for k, v in result.items() if k not in ("profile", "train_loss")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
