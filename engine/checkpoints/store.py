"""Checkpoints that restore everything, written atomically, never half-read.

One checkpoint is one folder that every rank writes into (Ray Train merges the ranks' files):

- ``trainable.safetensors`` (rank 0): the full fp32 trainable weights (ZeRO-3 gathers them first); exports
  and the DDP backend read these.
- ``state.json`` / ``job.json`` (rank 0): step, epoch, batches consumed in the epoch, best metric, history,
  the job.
- the backend's files: ``optimizer.pt`` + ``schedule.json`` (DDP, rank 0) or DeepSpeed's per-rank files.
- ``rank-<r>/rng.safetensors`` + ``rank-<r>/position.json``: each rank's torch/numpy/python RNG states and
  the sample ids it consumed (when ``data.id_column`` is set).
- ``manifest-rank<r>.json``: written last by each rank; lists its files with their sizes. A checkpoint is
  complete only when all ``world_size`` manifests are there and every listed file has its size.

No pickle from the checkpoint: weights and RNG states are safetensors, state is JSON, the DDP optimizer
state is read with ``torch.load(weights_only=True)``. (DeepSpeed's own files are read by DeepSpeed.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.checkpoints.atomic import atomic_path

log = logging.getLogger(__name__)

WEIGHTS = "trainable.safetensors"
STATE = "state.json"
JOB = "job.json"
RNG = "rng.safetensors"
POSITION = "position.json"
NAME_PATTERN = re.compile(r"^checkpoint_(\d+)_(\d+)$")


def manifest_name(rank: int) -> str:
    """The manifest file of ``rank``, written last."""
    return f"manifest-rank{rank}.json"


def rank_dir(rank: int) -> str:
    """The sub-folder with ``rank``'s own state."""
    return f"rank-{rank}"


def checkpoint_name(step: int, restarts: int) -> str:
    """Folder name of the checkpoint at ``step``; ``restarts`` keeps a re-run step from reusing a folder."""
    return f"checkpoint_{step:09d}_{restarts:03d}"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached, contiguous and on CPU, with :func:`trained_buffers`."""
    params = {n: p.detach().to("cpu").contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}
    return {**params, **trained_buffers(model)}


def trained_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics training changes beside the weights: the buffers (running mean and variance,
    batch count) of every batch norm whose own parameters train. Without them a fine-tuned CNN (ResNet,
    EfficientNet) would be restored with its new weights over the pre-trained statistics. Frozen batch norms
    keep their pre-trained statistics (``engine.models.surgery.keep_frozen_norm_statistics``) and are not saved."""
    out = {}
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in module.parameters(recurse=False)):
            for buffer_name, buffer in module.named_buffers(recurse=False):
                out[f"{name}.{buffer_name}" if name else buffer_name] = buffer.detach().to("cpu").contiguous().clone()
    return out


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors (and :func:`trained_buffers`) into ``model``; every saved name must exist in it."""
    params = {**dict(unwrap(model).named_buffers()), **dict(unwrap(model).named_parameters())}
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"checkpoint holds parameters the model does not have: {missing[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


# ---------------------------------------------------------------------------------------------------
# Completeness


def _manifest(path: Path, rank: int) -> dict[str, Any]:
    return json.loads((path / manifest_name(rank)).read_text())


def incomplete_reason(path: str | os.PathLike) -> str | None:
    """What makes the checkpoint at ``path`` unusable, naming the file (a manifest missing or unreadable,
    a listed file missing or of another size than recorded), or None when it is complete."""
    path = Path(path)
    try:
        world_size = int(_manifest(path, 0)["world_size"])
        for rank in range(world_size):
            for name, size in _manifest(path, rank)["files"].items():
                if not (path / name).is_file():
                    return f"{name} is missing (rank {rank}'s manifest lists it)"
                actual = (path / name).stat().st_size
                if actual != size:
                    return f"{name} has {actual} bytes, rank {rank}'s manifest recorded {size} (cut short while written?)"
        return None
    except FileNotFoundError as exc:
        return f"{Path(exc.filename or '?').name} is missing (a rank never finished writing its part)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"a manifest is unreadable ({type(exc).__name__}: {exc})"


def is_complete(path: str | os.PathLike) -> bool:
    """Whether every rank's manifest is there and every file they list exists at its recorded size."""
    return incomplete_reason(path) is None


def _write_manifest(folder: Path, rank: int, world_size: int) -> None:
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("manifest-rank")
    }
    (folder / manifest_name(rank)).write_text(json.dumps({"format": 2, "rank": rank, "world_size": world_size, "files": files}, indent=1))


# ---------------------------------------------------------------------------------------------------
# RNG states


def seed_rngs(seed: int) -> None:
    """Seed this process's torch, numpy and python RNGs (wav2vec2's SpecAugment masks draw from numpy's)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's torch (CPU and CUDA), numpy and python RNG states, plus named torch generators."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    for name, generator in (generators or {}).items():
        tensors[f"generator.{name}"] = generator.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, py_state, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(py_state), gauss]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back the states :func:`capture_rng` took."""
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    for name, generator in (generators or {}).items():
        if f"generator.{name}" in tensors:
            generator.set_state(tensors[f"generator.{name}"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))


# ---------------------------------------------------------------------------------------------------
# Writing and reading


def save_checkpoint(
    path: str | os.PathLike,
    *,
    backend: Any,
    rank: int,
    world_size: int,
    state: dict[str, Any],
    job: dict[str, Any],
    rank_state: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    """Write this rank's part of a checkpoint to ``path`` (a temporary sibling, renamed into place).

    A collective: every rank calls it (ZeRO-3 gathers weights, DeepSpeed saves its partitions).
    """
    path = Path(path)
    trainable = backend.trainable_state()
    with atomic_path(path) as tmp:
        (tmp / rank_dir(rank)).mkdir(parents=True)
        if rank == 0:
            save_file(trainable, tmp / WEIGHTS)
            (tmp / STATE).write_text(json.dumps(state, indent=1))
            (tmp / JOB).write_text(json.dumps(job, indent=1))
        backend.save(tmp, rank)
        tensors, meta = capture_rng(generators)
        save_file(tensors, tmp / rank_dir(rank) / RNG)
        (tmp / rank_dir(rank) / POSITION).write_text(json.dumps({"rng": meta, **(rank_state or {})}))
        _write_manifest(tmp, rank, world_size)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read the rank-0 part of a complete checkpoint: ``weights``, ``state`` and ``job``."""
    path = Path(path)
    reason = incomplete_reason(path)
    if reason:
        raise ValueError(f"checkpoint '{path}' is incomplete: {reason}")
    return {
        "weights": load_file(path / WEIGHTS),
        "state": json.loads((path / STATE).read_text()),
        "job": json.loads((path / JOB).read_text()),
    }


def restore_checkpoint(
    path: str | os.PathLike,
    *,
    backend: Any,
    rank: int,
    world_size: int,
    generators: dict[str, torch.Generator] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights, optimizer, schedule (through ``backend``) and this rank's RNG states.

    Returns:
        (the ``state.json`` dict, this rank's position dict).

    Raises:
        ValueError: the checkpoint is incomplete or was written by a different number of workers.
    """
    path = Path(path)
    reason = incomplete_reason(path)
    if reason:
        raise ValueError(f"checkpoint '{path}' is incomplete: {reason}")
    saved_world = _manifest(path, 0)["world_size"]
    if saved_world != world_size:
        raise ValueError(
            f"checkpoint '{path}' was written by {saved_world} workers but this run has {world_size}: "
            f"set scaling.num_workers to {saved_world} to resume it exactly"
        )
    backend.load(path)
    position = json.loads((path / rank_dir(rank) / POSITION).read_text())
    restore_rng(load_file(path / rank_dir(rank) / RNG), position.pop("rng"), generators)
    return json.loads((path / STATE).read_text()), position


# ---------------------------------------------------------------------------------------------------
# Finding the checkpoint to resume from


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """(step, restarts) of a checkpoint folder name, or None for other folders."""
    match = NAME_PATTERN.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def resume_candidates(folders: list[str]) -> list[str]:
    """The run's checkpoint folders (paths; other folders are left out), newest (step, restarts) first."""
    named = [f for f in folders if checkpoint_order(Path(f).name) is not None]
    return sorted(set(named), key=lambda f: checkpoint_order(Path(f).name), reverse=True)


@dataclass(frozen=True)
class RunFolder:
    """Where a Train run keeps its checkpoint folders: a pyarrow ``filesystem`` and a ``path`` on it.

    ``open_folder(path)`` is a context manager giving a local folder with that checkpoint's files (a
    download for remote storage); the default reads a local filesystem in place.
    """

    filesystem: Any
    path: str
    open_folder: Callable[[str], contextlib.AbstractContextManager[str]] = contextlib.nullcontext

    @classmethod
    def local(cls, path: str | os.PathLike) -> RunFolder:
        """A run folder on the local filesystem."""
        import pyarrow.fs

        return cls(pyarrow.fs.LocalFileSystem(), str(path))

    @classmethod
    def at(cls, location: str) -> RunFolder:
        """The run folder at a local path or URI (``s3://bucket/runs/job``), through :mod:`engine.checkpoints.storage`;
        ``open_folder`` downloads a remote checkpoint to a temporary folder."""
        from engine.checkpoints import storage

        filesystem, path = storage.resolve(location)
        if not storage.is_uri(location):
            return cls(filesystem, path)
        return cls(filesystem, path, lambda folder: storage.local_folder(storage.as_location(location, folder)))

    def incomplete_reason(self, folder: str) -> str | None:
        """:func:`incomplete_reason` of a checkpoint folder on this filesystem, reading only its manifests
        and the listed files' sizes (nothing is downloaded)."""
        import pyarrow.fs

        def manifest(rank: int) -> dict[str, Any]:
            with self.filesystem.open_input_stream(f"{folder}/{manifest_name(rank)}") as stream:
                return json.loads(stream.read())

        try:
            world_size = int(manifest(0)["world_size"])
            manifests = [manifest(rank) for rank in range(world_size)]
        except FileNotFoundError as exc:
            return f"{Path(str(exc.filename or exc)).name} is missing (a rank never finished writing its part)"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if "not exist" in str(exc) or "NOT_FOUND" in str(exc).upper():
                return "a manifest is missing (a rank never finished writing its part)"
            return f"a manifest is unreadable ({type(exc).__name__}: {exc})"
        for rank, listed in enumerate(manifests):
            infos = self.filesystem.get_file_info([f"{folder}/{name}" for name in listed["files"]])
            for (name, size), info in zip(listed["files"].items(), infos):
                if info.type != pyarrow.fs.FileType.File:
                    return f"{name} is missing (rank {rank}'s manifest lists it)"
                if info.size != size:
                    return f"{name} has {info.size} bytes, rank {rank}'s manifest recorded {size} (cut short while written?)"
        return None

    def checkpoints(self) -> list[str]:
        """The run's checkpoint folders, newest (step, restart index) first (none when the folder is missing)."""
        import pyarrow.fs

        if isinstance(self.filesystem, pyarrow.fs.LocalFileSystem):
            infos = self.filesystem.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True))
            return resume_candidates([info.path for info in infos if info.type == pyarrow.fs.FileType.Directory])
        # An object store: a folder is the objects under its prefix. Some S3 servers (SeaweedFS) keep listing a
        # prefix whose objects were all deleted, so only folders holding a file count.
        prefix = self.path.rstrip("/") + "/"
        infos = self.filesystem.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True, recursive=True))
        return resume_candidates([prefix + rest.split("/", 1)[0] for rest in
                                  (info.path[len(prefix):] for info in infos if info.type == pyarrow.fs.FileType.File and info.path.startswith(prefix))
                                  if "/" in rest])


def next_restart_index(run: RunFolder) -> int:
    """One more than the highest restart index among the run's checkpoint folders, so a restarted run's
    checkpoints never reuse a folder name (even one left incomplete by an earlier attempt)."""
    return max((checkpoint_order(Path(f).name)[1] for f in run.checkpoints()), default=-1) + 1


@contextlib.contextmanager
def open_latest_complete(run: RunFolder) -> Iterator[Path | None]:
    """A local folder with the newest *complete* checkpoint in the run folder, or None when it has none
    (training starts from step 0).

    Newest by (step, restart index) among the folders on storage, not only those Ray Train registered:
    a driver killed after the workers wrote a checkpoint but before Ray recorded it loses nothing. A
    checkpoint cut short while it was written (a manifest missing, a file of the wrong size) is skipped
    with a warning and the previous complete one is used.
    """
    candidates = run.checkpoints()
    for candidate in candidates:
        with run.open_folder(candidate) as folder:
            reason = incomplete_reason(Path(folder))
            if reason is None:
                yield Path(folder)
                return
        log.warning("skipping checkpoint '%s': %s", candidate, reason)
    if candidates:
        log.warning("no complete checkpoint in '%s': training starts from step 0", run.path)
    yield None
