"""Checkpoints: trainable weights in safetensors, optimizer state via ``torch.save`` loaded with
``weights_only=True``, everything else JSON. A manifest written last marks a checkpoint complete."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
JOB = "job.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached, contiguous and on CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors into ``model``; every saved name must exist in it."""
    params = dict(unwrap(model).named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"checkpoint holds parameters the model does not have: {missing[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def is_complete(path: str | os.PathLike) -> bool:
    """Whether a checkpoint folder has its manifest and every file the manifest lists, at its size."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def write_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    job: dict[str, Any],
) -> Path:
    """Write a complete checkpoint to ``path`` atomically (a temporary sibling renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state_dict(model), tmp / WEIGHTS)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    (tmp / JOB).write_text(json.dumps(job, indent=1))
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    (tmp / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a complete checkpoint: ``weights``, ``optimizer`` (or None), ``state`` and ``job``."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"checkpoint '{path}' is incomplete (no manifest or a file of the wrong size)")
    optimizer = torch.load(path / OPTIMIZER, weights_only=True) if (path / OPTIMIZER).exists() else None
    return {
        "weights": load_file(path / WEIGHTS),
        "optimizer": optimizer,
        "state": json.loads((path / STATE).read_text()),
        "job": json.loads((path / JOB).read_text()),
    }
