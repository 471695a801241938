"""Helpers for the resume and recovery tests: a dataset with sample ids, reading a run's final state."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tiny import FILLER, WORDS


def write_id_data(folder: Path, rows: int = 120, seed: int = 3) -> dict[str, str]:
    """Parquet train/validation splits of (id, text, label); train in 3 files so it streams as several blocks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def rows_of(n: int, start: int) -> dict[str, list]:
        labels = [rng.choice(sorted(WORDS)) for _ in range(n)]
        texts = [" ".join(rng.choice(WORDS[y] if rng.random() < 0.4 else FILLER) for _ in range(10)) for y in labels]
        return {"id": list(range(start, start + n)), "text": texts, "label": labels}

    train = rows_of(rows, 0)
    (folder / "train").mkdir(exist_ok=True)
    step = rows // 3
    for i in range(3):
        pq.write_table(pa.table({k: v[i * step:(i + 1) * step] for k, v in train.items()}), folder / "train" / f"part-{i}.parquet")
    pq.write_table(pa.table(rows_of(rows // 4, 10_000)), folder / "validation.parquet")
    return {"train": str(folder / "train"), "validation": str(folder / "validation.parquet")}


def id_job(name: str, model: Path, data: dict[str, str], out: Path, epochs: int, **scaling: Any) -> dict[str, Any]:
    """The resume and node-loss tests' job: 2 workers, checkpoints every 2 steps, sample ids kept for the audits."""
    return {
        "name": name,
        "model": {"name": str(model), "labels": ["food", "sport", "tech"]},
        "data": {**data, "max_length": 16, "rows_per_block": 20, "id_column": "id"},
        "finetune": {"freeze_depth": 1, "head_lr": 5e-3, "backbone_lr_ratio": 0.5},
        "optim": {"epochs": epochs, "batch_size": 8, "grad_accum": 2, "warmup_ratio": 0.25},
        "scaling": {"num_workers": 2, **scaling},
        "eval": {"every_n_steps": 2},
        "output": {"dir": str(out), "keep_checkpoints": 10, "export": "none"},
    }


def write_job(path: Path, raw: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run_dir(out: Path) -> Path:
    return out / "train"


def checkpoints(out: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    return sorted(p for p in run_dir(out).glob("checkpoint_*") if p.is_dir())


def bucket_checkpoints(run: str) -> list[str]:
    """The checkpoint folders (URIs) of a run folder in object storage, oldest first."""
    from engine.checkpoints import storage

    from engine.checkpoints.store import RunFolder

    return sorted(storage.as_location(run, path) for path in RunFolder.at(run).checkpoints())  # folders holding files


def bucket_incomplete_reason(checkpoint: str) -> str | None:
    """Why a checkpoint folder in object storage is incomplete, read from its manifests there (None: complete)."""
    from engine.checkpoints import storage
    from engine.checkpoints.store import RunFolder

    run = RunFolder.at(checkpoint.rsplit("/", 1)[0])
    return run.incomplete_reason(storage.resolve(checkpoint)[1])


def final_state(out: Path) -> dict[str, Any]:
    """Trainable weights, train state and each rank's consumed sample ids of a run's newest checkpoint."""
    return checkpoint_state(checkpoints(out)[-1])


def final_state_in_bucket(run: str, tmp: Path) -> dict[str, Any]:
    """:func:`final_state` of a run folder in object storage (its newest checkpoint downloaded to ``tmp``)."""
    from engine.checkpoints import storage

    newest = bucket_checkpoints(run)[-1]
    return checkpoint_state(storage.download_folder(newest, tmp / storage.name(newest)))


def checkpoint_state(last: Path) -> dict[str, Any]:
    """Trainable weights, train state and each rank's consumed sample ids of one checkpoint folder."""
    from safetensors.torch import load_file

    state = json.loads((last / "state.json").read_text())
    manifest = json.loads((last / "manifest-rank0.json").read_text())
    ids = [json.loads((last / f"rank-{r}" / "position.json").read_text())["sample_ids"] for r in range(manifest["world_size"])]
    return {"folder": last, "weights": load_file(last / "trainable.safetensors"), "state": state, "ids": ids}


def assert_same_training(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-for-bit equal weights, equal losses at every evaluation and the same sample ids in the same order."""
    import torch

    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
    losses = lambda s: [(h["step"], h["train_loss"], h["val_loss"]) for h in s["state"]["train"]["history"]]  # noqa: E731
    assert losses(a) == losses(b)
    assert a["ids"] == b["ids"]


def assert_each_id_once_per_epoch(ids_per_rank: list[list[int]], epochs: int, rows_per_rank: int) -> None:
    """Every rank consumed ``rows_per_rank`` distinct ids per epoch, the same set each epoch, none shared."""
    seen = set()
    for ids in ids_per_rank:
        assert len(ids) == epochs * rows_per_rank
        per_epoch = [ids[e * rows_per_rank:(e + 1) * rows_per_rank] for e in range(epochs)]
        assert all(len(set(chunk)) == rows_per_rank for chunk in per_epoch)  # no id twice within an epoch
        assert all(set(chunk) == set(per_epoch[0]) for chunk in per_epoch)  # none skipped
        assert not seen & set(per_epoch[0])  # ranks' shards are disjoint
        seen |= set(per_epoch[0])


def start_driver(job_path: str, tmp: Path, faults: dict[str, Any], *args: str) -> subprocess.Popen:
    """``shoulders train`` in its own process group with its own Ray (so the test can kill all of it)."""
    ray_tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, SHOULDERS_FAULTS=json.dumps(faults), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log = open(tmp / "driver.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli.main", "train", job_path, *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=Path(__file__).parents[2],
    )
    proc.log_path, proc.ray_tmp = tmp / "driver.log", ray_tmp
    return proc


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group, then any Ray process still running from its own temp folder."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    time.sleep(1)
    for pid in _pids_using(proc.ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(proc.ray_tmp, ignore_errors=True)


def _pids_using(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline or f"RAY_TMPDIR={marker}" in environ:
            pids.append(int(entry.name))
    return pids


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            tail = Path(proc.log_path).read_text()[-3000:]
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}:\n{tail}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
