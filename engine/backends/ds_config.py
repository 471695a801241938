"""The DeepSpeed config of a job: derived from the job's own fields, merged with a user's JSON.

Pure dict logic, no ``deepspeed`` or torch import, so ``shoulders validate`` checks a user's DeepSpeed
JSON against the job in well under a second. Every setting the job already decides (micro-batch size,
gradient accumulation, clipping, ZeRO stage, offload, precision) must either be absent from the JSON, be
``"auto"``, or agree with the job; a contradiction is an error naming both values, never a silent override.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_ZERO_STAGE = 2
ENGINE_OWNED_SECTIONS = ("optimizer", "scheduler")
"""DeepSpeed JSON sections the engine builds itself (AdamW over LR-ratio groups, the job's schedule)."""


def read_ds_json(path: str) -> dict[str, Any]:
    """Read a user's DeepSpeed JSON file.

    Raises:
        ValueError: the file is missing or not a JSON object (the message names the file).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"backend.config: DeepSpeed config file '{path}' does not exist")
    try:
        data = json.loads(file.read_text())
    except ValueError as exc:
        raise ValueError(f"backend.config: '{path}' is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"backend.config: '{path}' must hold a JSON object")
    return data


def zero_stage(backend: Any) -> int:
    """The ZeRO stage a job runs: ``backend.zero_stage``, else the JSON's, else 2."""
    if backend.zero_stage is not None:
        return backend.zero_stage
    user = (backend.config or {}).get("zero_optimization", {})
    stage = user.get("stage", "auto") if isinstance(user, dict) else "auto"
    if stage == "auto":
        return DEFAULT_ZERO_STAGE
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ValueError(f"backend.config: zero_optimization.stage is {stage!r}; DeepSpeed's ZeRO stages are 0, 1, 2 and 3 (or \"auto\")")
    return stage


def offload_device(backend: Any, field: str) -> str:
    """Where ZeRO keeps the optimizer state (``offload_optimizer``) or parameters (``offload_params``):
    the job's flag, else the JSON's ``device``, else ``none``."""
    flag = getattr(backend, field)
    if flag is not None:
        return "cpu" if flag else "none"
    section = "offload_optimizer" if field == "offload_optimizer" else "offload_param"
    device = _get(backend.config or {}, ("zero_optimization", section, "device"))
    return "none" if device in (None, "auto") else str(device)


def _precision_flags(precision: str, bf16_supported: bool | None) -> tuple[bool, bool] | None:
    """(bf16, fp16) enabled for ``optim.precision``; None when ``auto`` is decided by the device later."""
    if precision == "bf16":
        return True, False
    if precision == "fp16":
        return False, True
    if precision == "fp32":
        return False, False
    if bf16_supported is None:
        return None
    return bf16_supported, False


def job_ds_settings(job: Any, world_size: int | None = None, bf16_supported: bool | None = None) -> dict[tuple[str, ...], Any]:
    """The DeepSpeed settings the job decides, keyed by their path in the DeepSpeed config.

    Args:
        job: the validated :class:`engine.config.schema.JobSpec`.
        world_size: workers (defaults to ``scaling.num_workers``).
        bf16_supported: whether the device has bf16 (decides ``optim.precision: auto``); None leaves
            the precision keys out (validation time, before the device is known).
    """
    world = world_size or job.scaling.num_workers
    optim, backend = job.optim, job.backend
    settings: dict[tuple[str, ...], Any] = {
        ("train_micro_batch_size_per_gpu",): optim.batch_size,
        ("gradient_accumulation_steps",): optim.grad_accum,
        ("train_batch_size",): optim.batch_size * optim.grad_accum * world,
        ("gradient_clipping",): float(optim.max_grad_norm or 0.0),
        ("zero_optimization", "stage"): zero_stage(backend),
        ("zero_optimization", "offload_optimizer", "device"): offload_device(backend, "offload_optimizer"),
        ("zero_optimization", "offload_param", "device"): offload_device(backend, "offload_params"),
    }
    flags = _precision_flags(optim.precision, bf16_supported)
    if flags is not None:
        settings[("bf16", "enabled")], settings[("fp16", "enabled")] = flags
    return settings


JOB_KEYS = {
    ("train_micro_batch_size_per_gpu",): "optim.batch_size",
    ("gradient_accumulation_steps",): "optim.grad_accum",
    ("train_batch_size",): "optim.batch_size x optim.grad_accum x scaling.num_workers",
    ("gradient_clipping",): "optim.max_grad_norm",
    ("zero_optimization", "stage"): "backend.zero_stage",
    ("zero_optimization", "offload_optimizer", "device"): "backend.offload_optimizer",
    ("zero_optimization", "offload_param", "device"): "backend.offload_params",
    ("bf16", "enabled"): "optim.precision",
    ("fp16", "enabled"): "optim.precision",
}
"""Which job field decides each DeepSpeed key (named in contradiction errors)."""


def _get(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = config
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = config
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _agree(user: Any, ours: Any) -> bool:
    if isinstance(ours, bool) or isinstance(user, bool):
        return bool(user) == bool(ours)
    if isinstance(ours, (int, float)) and isinstance(user, (int, float)):
        return float(user) == float(ours)
    return str(user).lower() == str(ours).lower()


def contradictions(user: dict[str, Any], settings: dict[tuple[str, ...], Any]) -> list[str]:
    """Human-readable contradictions between a user's DeepSpeed JSON and the job's settings."""
    problems = [
        f"the DeepSpeed config has an '{section}' section, but the engine builds the {section} from the "
        f"job's optim and finetune sections (LR ratio groups): remove '{section}' from the JSON"
        for section in ENGINE_OWNED_SECTIONS
        if section in user
    ]
    for path, ours in settings.items():
        theirs = _get(user, path)
        if theirs is None or theirs == "auto":
            continue
        if not _agree(theirs, ours):
            problems.append(
                f"DeepSpeed '{'.'.join(path)}' is {theirs!r} but the job's {JOB_KEYS[path]} gives {ours!r}: "
                "make them agree, or set the DeepSpeed value to \"auto\" (or remove it)"
            )
    return problems


def check_ds_config(job: Any) -> None:
    """Raise ValueError naming every contradiction between ``backend.config`` and the job."""
    if not job.backend.config:
        return
    problems = contradictions(job.backend.config, job_ds_settings(job))
    if problems:
        raise ValueError("backend.config: " + "; ".join(problems))


def build_ds_config(job: Any, world_size: int, bf16_supported: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize``: the user's JSON filled with the job's settings.

    Raises:
        ValueError: the JSON contradicts the job (checked again with the real world size and device).
    """
    user = json.loads(json.dumps(job.backend.config or {}))
    settings = job_ds_settings(job, world_size, bf16_supported)
    problems = contradictions(user, settings)
    if problems:
        raise ValueError("backend.config: " + "; ".join(problems))
    for path, value in settings.items():
        _set(user, path, value)
    # A torch AdamW over the LR-ratio groups: DeepSpeed's own optimizers need compiled ops.
    user.setdefault("zero_allow_untested_optimizer", True)
    if offload_device(job.backend, "offload_optimizer") != "none":
        user.setdefault("zero_force_ds_cpu_optimizer", False)
    user.setdefault("steps_per_print", 10**9)
    user.setdefault("wall_clock_breakdown", False)
    return user
