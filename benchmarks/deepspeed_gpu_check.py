"""DeepSpeed through the engine: a ZeRO-2 and a ZeRO-3 LoRA job (frozen bottom block, LR-ratio groups),
exactly as ``shoulders train`` runs them, on 1 GPU (or 2 CPU workers where there is none).

Prints one JSON line per case (card, versions, stage, wall time, losses, the LRs DeepSpeed's optimizer
applied, whether the consolidated adapter export loads with plain peft) and exits 0; a failed case is a
line with ``"ok": false`` and the error. Self-contained: it builds a small BERT from a config and its data.

    python benchmarks/deepspeed_gpu_check.py [--cpu] [--work /tmp/ds-check]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def versions() -> dict[str, str]:
    import importlib

    out = {}
    for name in ("torch", "deepspeed", "ray", "transformers", "peft"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - report, do not fail
            out[name] = f"missing ({type(exc).__name__})"
    return out


def build_model(folder: Path, gpu: bool) -> Path:
    """A BERT built from a config with the test word tokenizer: tiny on CPU, 4 x 256 on a GPU."""
    import torch
    import transformers

    import tiny

    tokenizer = tiny.tiny_tokenizer(folder)
    size = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024) if gpu else \
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(transformers.BertConfig(vocab_size=len(tokenizer), max_position_embeddings=64, **size)).save_pretrained(folder)
    return folder


def job_for(stage: int, model: Path, data: dict[str, Path], out: Path, gpu: bool) -> dict:
    return {
        "name": f"ds-zero{stage}-lora",
        "model": {"name": str(model), "labels": ["food", "sport", "tech"]},
        "data": {k: str(v) for k, v in data.items()} | {"max_length": 32, "rows_per_block": 64},
        "finetune": {"freeze_depth": 1, "head_lr": 1e-2, "adapter_lr_ratio": 0.5, "backbone_lr_ratio": 0.1},
        "peft": {"method": "lora", "r": 8, "target_modules": ["query", "value"]},
        "optim": {"epochs": 2, "batch_size": 16, "grad_accum": 2, "warmup_ratio": 0.1},
        "scaling": {"num_workers": 1 if gpu else 2, "cpus_per_worker": 1 if gpu else 0.5, "use_gpu": gpu},
        "backend": {"name": "deepspeed", "zero_stage": stage},
        # The forgetting probe runs before DeepSpeed casts the model; on a GPU it met perf's bf16 frozen
        # weights without autocast (H200 run 1: "mat1 and mat2 must have the same dtype"). Not DeepSpeed's part.
        "safeguards": {"track_forgetting": False},
        "output": {"dir": str(out), "export": "adapter"},
    }


def export_loads(export: Path, model: Path) -> bool:
    """The adapter export has full-size tensors and loads onto the base model with plain peft."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    tensors = load_file(export / "adapter_model.safetensors")
    base = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=3)
    PeftModel.from_pretrained(base, str(export))
    return bool(tensors) and all(t.numel() > 0 for t in tensors.values())


def run_case(stage: int, model: Path, data: dict[str, Path], work: Path, gpu: bool) -> dict:
    from cluster.preflight.job import preflight
    from cluster.run.trainer import run_training
    from engine.config.schema import build_job

    start = time.perf_counter()
    raw = job_for(stage, model, data, work / f"zero{stage}", gpu)
    job, info = preflight(build_job(raw))
    summary = run_training(job, info)
    last = summary.history[-1]
    return {
        "stage": stage,
        "wall_s": round(time.perf_counter() - start, 1),
        "steps": last["step"],
        "train_loss": [round(h["train_loss"], 5) for h in summary.history],
        "val_accuracy": last.get("val_accuracy"),
        "test": summary.test,
        "lrs_at_end": {k: v for k, v in last.items() if k.startswith("lr_")},
        "peak_mem_gib": max((h.get("peak_mem_gib", 0) for h in summary.history), default=None),
        "export_loads_with_peft": export_loads(summary.export_dir, model),
        "job": job.model_dump(mode="json"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="2 CPU workers even where a GPU exists")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch

    import tiny
    from cluster.run.trainer import ensure_ray

    gpu = torch.cuda.is_available() and not args.cpu
    card = torch.cuda.get_device_name() if gpu else "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="ds-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TMPDIR", str(work / "ray"))
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    model = build_model(work / "model", gpu)
    data = tiny.write_topic_data(work / "data", rows=960 if gpu else 240, files=4)
    if not ray.is_initialized():
        ray.init(num_cpus=max(os.cpu_count() or 2, 4), include_dashboard=False, configure_logging=False)
    ensure_ray()
    try:
        for stage in (2, 3):
            row = {"case": f"deepspeed_zero{stage}_lora", "device": card, "versions": versions()}
            try:
                row.update(run_case(stage, model, data, work, gpu), ok=True)
            except Exception as exc:  # noqa: BLE001 - one line per case, the next case still runs
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:800], trace=traceback.format_exc()[-1500:])
            print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
