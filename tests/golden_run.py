"""Golden runs: each task's tiny model trained a few steps through the real per-worker path, without Ray.

The driver side runs for real (``cluster.preflight.job.preflight``, ``cluster.ingest.datasets.build_datasets`` with its
preprocessing functions, ``cluster.ingest.text.answer_samples``, the task's ``preprocessors``)
over an in-process stand-in for Ray Data (:class:`LocalDataset`: the same ``map_batches`` calls, applied
in order); the worker side is ``engine.loop.recipe.train_loop_per_worker`` itself, with ``ray.train``'s context,
shards and ``report`` replaced by local stand-ins (one worker, CPU). The reported metrics (losses, task
metrics, learning rates; not timings) are what ``tests/golden/golden.json`` records.

Regenerate (only when a behaviour change is intended, and say so in the commit)::

    PYTHONPATH=. python tests/golden_run.py --write
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

GOLDEN = Path(__file__).parent / "golden" / "golden.json"
KEPT_KEYS = ("step", "epoch", "train_loss")
KEPT_PREFIXES = ("val_", "lr_")
DROPPED_PREFIXES = ("val_rows_per_s",)


# ---------------------------------------------------------------- a local stand-in for Ray Data

def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not batches:
        return {}
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


class LocalDataset:
    """The few ``ray.data.Dataset`` operations ingest uses, applied eagerly on numpy columns in one process."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def map_batches(self, fn: Callable, *, fn_kwargs: dict[str, Any] | None = None, batch_format: str = "numpy",
                    batch_size: int | None = None, **_: Any) -> LocalDataset:
        n = len(self)
        size = batch_size or max(n, 1)
        out = [fn({k: v[i:i + size] for k, v in self.columns.items()}, **(fn_kwargs or {})) for i in range(0, n, size)]
        return LocalDataset(_concat(out))

    def repartition(self, **_: Any) -> LocalDataset:
        return self

    def randomize_block_order(self, seed: int | None = None) -> LocalDataset:
        return self

    def count(self) -> int:
        return len(self)

    def sum(self, column: str) -> int:
        return int(self.columns[column].sum())

    def drop_columns(self, names: list[str]) -> LocalDataset:
        return LocalDataset({k: v for k, v in self.columns.items() if k not in names})


def _read(fmt: str) -> Callable[..., LocalDataset]:
    def read(files: list[str], shuffle: Any = None, include_paths: bool = False, **_: Any) -> LocalDataset:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.json as pajson
        import pyarrow.parquet as pq

        tables = []
        for f in files:
            table = {"parquet": pq.read_table, "csv": pacsv.read_csv, "json": pajson.read_json}[fmt](f)
            if include_paths:
                table = table.append_column("path", pa.array([f] * table.num_rows))
            tables.append(table)
        table = pa.concat_tables(tables)
        return LocalDataset({name: np.asarray(table.column(name).to_pylist(), dtype=object) if not pa.types.is_integer(table.column(name).type)
                             else table.column(name).to_numpy() for name in table.column_names})

    return read


class LocalShard:
    """``ray.train.get_dataset_shard``'s iterator over a LocalDataset: one worker, a seeded local shuffle."""

    def __init__(self, dataset: LocalDataset):
        self.dataset = dataset

    def iter_torch_batches(self, *, batch_size: int, collate_fn: Callable, local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None, **_: Any) -> Iterator[Any]:
        n = len(self.dataset)
        order = np.random.default_rng(local_shuffle_seed).permutation(n) if local_shuffle_buffer_size else np.arange(n)
        for i in range(0, n, batch_size):
            rows = order[i:i + batch_size]
            yield collate_fn({k: v[rows] for k, v in self.dataset.columns.items()})


class LocalContext:
    """``ray.train.get_context()`` of a single worker whose run folder is a local temporary folder."""

    def __init__(self, storage_dir: str):
        import pyarrow.fs

        self.storage = type("Storage", (), {"storage_filesystem": pyarrow.fs.LocalFileSystem(), "experiment_fs_path": storage_dir})()

    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_local_rank(self) -> int:
        return 0

    def get_storage(self) -> Any:
        return self.storage


@contextlib.contextmanager
def local_ray(datasets: dict[str, LocalDataset] | None, storage_dir: str, reports: list[dict[str, Any]]) -> Iterator[None]:
    """Replace the Ray APIs ingest and the worker loop call with the local stand-ins, restoring them after."""
    import ray
    import ray.data
    import ray.train
    import ray.train.torch
    import torch

    import cluster.ingest.read as data_read

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    readers = {fmt: _read(fmt) for fmt in ("parquet", "csv", "json")}
    patch(data_read, "READERS", readers)
    patch(ray, "cluster_resources", lambda: {"object_store_memory": 2**40, "CPU": 2.0})
    context = LocalContext(storage_dir)
    patch(ray.train, "get_context", lambda: context)
    patch(ray.train, "get_dataset_shard", lambda name: LocalShard(datasets[name]))
    patch(ray.train, "report", lambda metrics, checkpoint=None, checkpoint_dir_name=None: reports.append(dict(metrics)))
    patch(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    patch(ray, "get_runtime_context", lambda: type("Runtime", (), {"get_node_id": lambda self: "local"})())
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


# ---------------------------------------------------------------- one golden run

def kept_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The deterministic part of one evaluation's metrics: losses, task metrics, learning rates (no timings)."""
    keep = {}
    for key, value in metrics.items():
        if key.startswith(DROPPED_PREFIXES) or not isinstance(value, (int, float)):
            continue
        if key in KEPT_KEYS or key.startswith(KEPT_PREFIXES):
            keep[key] = float(value)
    return keep


def run_golden(raw_job: dict[str, Any], workdir: Path) -> list[dict[str, float]]:
    """Train ``raw_job`` (one worker, CPU) through preflight, ingest and the worker loop; the kept metrics of each evaluation."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded numbers: one thread's summation order (restored after, for later tests)
    try:
        return _run_golden(raw_job, workdir)
    finally:
        torch.set_num_threads(threads)


def _run_golden(raw_job: dict[str, Any], workdir: Path) -> list[dict[str, float]]:
    from cluster.ingest.datasets import build_datasets
    from cluster.ingest.text import answer_samples
    from cluster.preflight.job import preflight
    from engine.config.schema import JobSpec
    from engine.loop.recipe import train_loop_per_worker
    from engine.tasks import get_task

    raw_job = {**raw_job, "output": {"dir": str(workdir / "out"), "export": "none"}}
    job, info = preflight(JobSpec.model_validate(raw_job))
    reports: list[dict[str, Any]] = []
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    with local_ray(None, str(storage), reports):
        datasets, num_train_rows = build_datasets(job, info)
        config = {
            "job": job.model_dump(mode="json"),
            "labels": info.labels,
            "num_train_rows": num_train_rows,
            "pad_token_id": get_task(job.model.task).preprocessors(job)[1],
            "retention_texts": None,
            "faults": None,
            "answer_samples": answer_samples(job, info),
            "console": None,
        }
    with local_ray(datasets, str(storage), reports):
        train_loop_per_worker(config)
    return [kept_metrics(m) for m in reports]


# ---------------------------------------------------------------- the cases

BASE: dict[str, Any] = {"optim": {"max_steps": 3, "batch_size": 4}, "eval": {"every_n_steps": 1}, "seed": 7}


def _job(name: str, model: dict[str, Any], data: dict[str, Any], **sections: Any) -> dict[str, Any]:
    job = {"name": name, "model": model, "data": data, **BASE}
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


def build_assets(root: Path) -> dict[str, Path]:
    """Tiny models and datasets of every task, built offline under ``root``."""
    import tiny
    import tiny_chat
    import tiny_speech
    from cluster.datagen.speech_models import save_tiny_wav2vec2, save_tiny_whisper
    import tiny_vision

    assets: dict[str, Any] = {
        "bert": tiny.save_tiny_model("bert", root / "bert"),
        "llama_lm": tiny.save_tiny_model("llama", root / "llama-lm", task="causal_lm"),
        "chat": tiny_chat.save_tiny_chat_model(root / "chat"),
        "t5": tiny_chat.save_tiny_t5(root / "t5"),
        "wav2vec2": save_tiny_wav2vec2(root / "wav2vec2"),
        "whisper": save_tiny_whisper(root / "whisper"),
        **{kind: tiny_vision.save_tiny_image_model(kind, root / kind) for kind in ("vit", "resnet", "convnext")},
    }
    assets["topics"] = tiny.write_topic_data(root / "topics", rows=32)
    assets["lm"] = tiny.write_lm_data(root / "lm", rows=32)
    assets["instruct"] = tiny_chat.write_instruction_data(root / "instruct", rows=32)
    assets["tones"] = tiny_speech.write_tone_keywords(root / "tones", per_word=4, seconds=0.4)
    assets["colours"] = tiny_vision.write_colour_images(root / "colours", per_class=8)
    return assets


def cases(a: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One job per task (and per text layout of the generative tasks), on the tiny assets."""
    topics = {"train": str(a["topics"]["train"]), "validation": str(a["topics"]["validation"])}
    tones = {"train": str(a["tones"]["train"]), "validation": str(a["tones"]["validation"]), "audio_column": "path", "rows_per_block": 8}
    instruct = {"max_length": 40, "rows_per_block": 16, "system_prompt": "answer in one word"}
    pc = {**instruct, "train": str(a["instruct"]["pc_train"]), "validation": str(a["instruct"]["pc_validation"]), "layout": "prompt_completion"}
    chat = {**instruct, "train": str(a["instruct"]["chat_train"]), "validation": str(a["instruct"]["chat_validation"]), "layout": "chat"}
    generate = {"answer_samples": 2, "max_new_tokens": 4}
    colours = {"train": str(a["colours"]["train"]), "validation": str(a["colours"]["validation"]), "image_column": "image", "rows_per_block": 8}
    image = {"task": "image_classification", "labels": ["red", "green", "blue"]}
    return {
        "sequence_classification": _job(
            "golden-cls", {"name": str(a["bert"]), "labels": ["food", "sport", "tech"]}, {**topics, "max_length": 16, "rows_per_block": 16},
            finetune={"freeze_depth": 1, "head_lr": 1e-2, "backbone_lr_ratio": 0.1},
        ),
        "causal_lm_text": _job(
            "golden-lm", {"name": str(a["llama_lm"]), "task": "causal_lm"},
            {"train": str(a["lm"]["train"]), "validation": str(a["lm"]["validation"]), "max_length": 16, "rows_per_block": 16},
            finetune={"strategy": "full", "head_lr": 1e-2, "backbone_lr_ratio": 0.5},
        ),
        "causal_lm_chat_lora": _job(
            "golden-chat", {"name": str(a["chat"]), "task": "causal_lm"}, chat,
            finetune={"strategy": "lora", "head_lr": 5e-2}, peft={"r": 4, "target_modules": "all-linear"}, eval=generate,
        ),
        "causal_lm_prompt_completion": _job(
            "golden-pc", {"name": str(a["chat"]), "task": "causal_lm"}, pc,
            finetune={"strategy": "full", "head_lr": 1e-2, "backbone_lr_ratio": 1.0}, eval=generate,
        ),
        "seq2seq": _job(
            "golden-t5", {"name": str(a["t5"]), "task": "seq2seq"}, pc,
            finetune={"strategy": "lora", "head_lr": 5e-2}, peft={"r": 4, "target_modules": ["q", "v"]}, eval=generate,
            safeguards={"track_forgetting": False},
        ),
        "audio_classification": _job(
            "golden-kw", {"name": str(a["wav2vec2"]), "task": "audio_classification"}, {**tones, "label_column": "label", "max_audio_seconds": 0.5},
            finetune={"strategy": "full", "freeze_feature_encoder": False, "head_lr": 3e-3, "backbone_lr_ratio": 1.0},
        ),
        "ctc": _job(
            "golden-ctc", {"name": str(a["wav2vec2"]), "task": "ctc"},
            {**tones, "transcript_column": "transcript", "max_audio_seconds": 0.5, "max_length": 8},
            finetune={"strategy": "full", "head_lr": 3e-3, "backbone_lr_ratio": 1.0},
        ),
        "speech_seq2seq": _job(
            "golden-whisper", {"name": str(a["whisper"]), "task": "speech_seq2seq", "language": "en"},
            {**tones, "transcript_column": "transcript", "max_length": 8},
            finetune={"strategy": "lora", "head_lr": 3e-3}, peft={"r": 4, "target_modules": ["q_proj", "v_proj"]},
        ),
        "image_classification_vit": _job(
            "golden-vit", {"name": str(a["vit"]), **image}, colours, finetune={"freeze_depth": 1, "head_lr": 1e-2, "backbone_lr_ratio": 0.1},
        ),
        "image_classification_resnet": _job(
            "golden-resnet", {"name": str(a["resnet"]), **image}, {**colours, "crop_scale": [0.5, 1.0]},
            finetune={"strategy": "full", "head_lr": 1e-2, "backbone_lr_ratio": 0.3},
        ),
        "image_classification_convnext": _job(
            "golden-convnext", {"name": str(a["convnext"]), **image}, {**colours, "hflip": False}, finetune={"strategy": "feature_extraction"},
        ),
    }


def run_all(root: Path, names: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Every case's golden metrics (or those named)."""
    all_cases = cases(build_assets(root / "assets"))
    return {name: run_golden(job, root / name) for name, job in all_cases.items() if names is None or name in names}


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory(prefix="shoulders-golden-") as tmp:
        os.environ["HF_HOME"] = tmp + "/hf"
        results = run_all(Path(tmp), [a for a in argv if not a.startswith("--")] or None)
    text = json.dumps(results, indent=1, sort_keys=True) + "\n"
    if "--write" in argv:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
