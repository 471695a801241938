"""Fault injection for recovery tests: kill a worker or slow the steps down, driven by ``SHOULDERS_FAULTS``.

``SHOULDERS_FAULTS`` is a JSON object read on the driver (:func:`fault_settings`) and handed to the workers
in the train-loop config, so it reaches them on any cluster. Keys:

- ``kill_at_step`` / ``kill_rank`` / ``kill_marker``: after optimizer step ``kill_at_step`` the worker of
  rank ``kill_rank`` SIGKILLs itself, once (it first creates the ``kill_marker`` file; an existing marker
  disarms the fault, so the restarted worker carries on). ``kill_delay_s`` waits first, so Ray Train's
  controller (which polls workers every 2 s) has registered the checkpoint reported just before.
- ``step_sleep_s``: sleep this long after every optimizer step (lets a test kill the driver mid-run).
- ``frozen_digest``: record a SHA-256 of the frozen weights in every checkpoint (``rank-<r>/position.json``),
  gathered first under ZeRO-3, so a test can check they are still the pre-trained ones after a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

ENV = "SHOULDERS_FAULTS"


def fault_settings() -> dict[str, Any]:
    """The fault-injection settings from ``SHOULDERS_FAULTS`` (empty when unset)."""
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else {}


def inject_step_faults(settings: dict[str, Any] | None, rank: int, step: int) -> None:
    """After optimizer step ``step`` on worker ``rank``: sleep and/or SIGKILL this process, as ``settings`` ask."""
    if not settings:
        return
    if settings.get("step_sleep_s"):
        time.sleep(float(settings["step_sleep_s"]))
    if settings.get("kill_at_step") == step and settings.get("kill_rank", 0) == rank:
        marker = Path(settings["kill_marker"])
        if not marker.exists():
            time.sleep(float(settings.get("kill_delay_s", 0)))
            marker.write_text(f"rank {rank} killed itself after step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


def frozen_digest(model: Any) -> str:
    """SHA-256 over the names and bytes of ``model``'s frozen parameters and its buffers (where the
    FP8 / compute-dtype copies ``perf`` makes of frozen weights are, as non-persistent buffers); call with
    the parameters gathered."""
    import torch

    digest = hashlib.sha256()
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    for name, tensor in sorted(frozen + list(model.named_buffers()), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def audit(settings: dict[str, Any] | None, backend: Any) -> dict[str, Any]:
    """Extra per-rank checkpoint entries the settings ask for (a collective under ZeRO-3: every rank calls it)."""
    if not settings or not settings.get("frozen_digest"):
        return {}
    with backend.gathered():
        return {"frozen_digest": frozen_digest(backend.module)}
