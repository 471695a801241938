"""The job schema: the only definition of a job.

A job is a YAML file validated against :class:`JobSpec`. Every section forbids unknown keys, every
field carries a docstring (``shoulders validate --explain`` prints them), and ``key=value`` overrides
from the command line are typed by the same schema. Strategy presets only fill fields the user left
unset. Nothing here imports torch or Ray, so validation answers in well under a second.
"""

from __future__ import annotations

import difflib
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from engine.config.job_yaml import load_yaml, read_job_yaml
from engine.config.data_section import SOURCE_TAGS, DataSpec
from engine.config.sections import (
    Section, ModelSpec, FinetuneSpec,
    PeftSpec, OptimSpec, ScalingSpec, BackendSpec, PerfSpec, EvalSpec, OutputSpec, RunSpec, TuneSpec, SafeguardsSpec,
    TrackingSpec,
)
from engine.errors import JobError
from engine.tasks import get_task


class JobSpec(Section):
    """One transfer-learning job."""

    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    """Name of the run; used in the output folder and in Ray. Letters, digits, ``.``, ``_`` and ``-``
    (no ``/``: the output stays inside ``output.dir``)."""
    model: ModelSpec
    """The pre-trained model and the task it is adapted to."""
    data: DataSpec
    """Where the data is and which columns hold what."""
    finetune: FinetuneSpec = FinetuneSpec()
    """How much of the pre-trained model learns, and how fast."""
    peft: PeftSpec = PeftSpec()
    """Parameter-efficient fine-tuning (adapters)."""
    optim: OptimSpec = OptimSpec()
    """Optimizer, schedule and batch sizes."""
    scaling: ScalingSpec = ScalingSpec()
    """Workers and resources."""
    backend: BackendSpec = BackendSpec()
    """Distributed backend."""
    perf: PerfSpec = PerfSpec()
    """Speed features (fused kernels, FP8 frozen matmuls, packing, prefetching); defaults are the fast ones."""
    eval: EvalSpec = EvalSpec()
    """Evaluation, checkpoint choice and early stopping."""
    output: OutputSpec = OutputSpec()
    """Where results go."""
    run: RunSpec = RunSpec()
    """Where checkpoints are stored (local path or filesystem URI), on a laptop or a cluster."""
    seed: int = 42
    """Seed for weights of new heads, data order and dropout."""
    tune: TuneSpec = TuneSpec()
    """Search over freeze depth, LR ratios and any other key (``shoulders tune``)."""
    safeguards: SafeguardsSpec = SafeguardsSpec()
    """Negative transfer, forgetting, overfitting and gradual unfreezing."""
    tracking: TrackingSpec = TrackingSpec()
    """Experiment tracking: TensorBoard (on by default), MLflow and Weights & Biases."""

    @model_validator(mode="before")
    @classmethod
    def _fill_strategy_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        finetune = data.get("finetune") or {}
        strategy = finetune.get("strategy") if isinstance(finetune, dict) else None
        if strategy not in STRATEGY_PRESETS:
            return data
        data = dict(data)
        for dotted, value in STRATEGY_PRESETS[strategy].items():
            section, key = dotted.split(".")
            current = dict(data.get(section) or {})
            current.setdefault(key, value)
            data[section] = current
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> JobSpec:
        if self.output.export == "adapter" and self.peft.method == "none":
            raise ValueError("output.export is 'adapter' but peft.method is 'none': set a PEFT method or export 'merged'")
        task = get_task(self.model.task)
        task.check_job(self)  # the data layout and labels fit the task
        if self.model.labels is not None and len(set(self.model.labels)) != len(self.model.labels):
            raise ValueError("model.labels has duplicates: list each class once")
        if self.optim.max_steps is None and self.optim.epochs is None:
            raise ValueError("set optim.epochs or optim.max_steps")
        for key, metric in (("eval.metric", self.eval.metric), ("tune.metric", self.tune.metric)):
            if metric is not None and metric not in task.metrics:
                raise ValueError(
                    f"{key} '{metric}' is not a metric of model.task '{self.model.task}'; "
                    f"it reports {', '.join(task.metrics)}"
                )
        unfreezing = self.safeguards.unfreeze_every_steps or self.safeguards.unfreeze_every_epochs
        if unfreezing and self.peft.method != "none":
            raise ValueError("safeguards.unfreeze_every_* (gradual unfreezing) needs peft.method 'none': adapters already train every block")
        self._check_backend(bool(unfreezing))
        return self

    def _check_backend(self, unfreezing: bool) -> None:
        backend = self.backend
        if backend.name != "deepspeed":
            for key in ("zero_stage", "offload_optimizer", "offload_params", "config"):
                if getattr(backend, key) not in (None, False):
                    raise ValueError(f"backend.{key} is set but backend.name is '{backend.name}': set backend.name: deepspeed or remove it")
            return
        from engine.backends.ds_config import check_ds_config, zero_stage

        if unfreezing:
            raise ValueError("safeguards.unfreeze_every_* (gradual unfreezing) is not supported with backend.name 'deepspeed': use ddp")
        if backend.offload_params and zero_stage(backend) != 3:
            raise ValueError(f"backend.offload_params needs ZeRO stage 3 but backend.zero_stage is {zero_stage(backend)}")
        if backend.offload_optimizer and zero_stage(backend) == 0:
            raise ValueError("backend.offload_optimizer needs ZeRO stage 1, 2 or 3 but backend.zero_stage is 0")
        check_ds_config(self)

    # Derived settings: one place decides them.
    @property
    def eval_metric(self) -> str:
        """The validation metric that picks checkpoints."""
        return get_task(self.model.task).eval_metric(self)

    @property
    def eval_mode(self) -> Literal["max", "min"]:
        """Whether ``eval_metric`` is better higher or lower."""
        if self.eval.mode:
            return self.eval.mode
        lower_is_better = ("loss", "perplexity", "wer", "cer", "forgetting")
        return "min" if any(word in self.eval_metric for word in lower_is_better) else "max"

    @property
    def output_dir(self) -> Path:
        """The resolved output folder."""
        return Path(self.output.dir.replace("{name}", self.name)).expanduser().resolve()

    @property
    def results_location(self) -> str:
        """Where the export and the result files go: ``output.uri`` (``{name}`` replaced) or the output folder."""
        if self.output.uri:
            from engine.checkpoints.storage import normalize

            return normalize(self.output.uri.replace("{name}", self.name))
        return str(self.output_dir)


STRATEGY_PRESETS: dict[str, dict[str, Any]] = {
    "feature_extraction": {"finetune.freeze_depth": "all", "peft.method": "none", "finetune.head_lr": 1e-2},
    "light": {"finetune.freeze_depth": -2, "peft.method": "none"},
    "full": {"finetune.freeze_depth": 0, "peft.method": "none"},
    "lora": {"finetune.freeze_depth": 0, "peft.method": "lora"},
}
"""What each ``finetune.strategy`` fills in (only where the job leaves the field unset). Feature extraction
trains a linear probe on frozen features, which wants a learning rate ten times a fine-tune's or more."""


def plan_steps(job: JobSpec, num_train_rows: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for this job on ``world_size`` workers: what every
    worker's loop runs, and what a search's scheduler counts in (torch-free: the driver plans with it)."""
    rows_per_worker = max(num_train_rows // world_size, 1)
    micro_batches = math.ceil(rows_per_worker / job.optim.batch_size)
    steps_per_epoch = max(micro_batches // job.optim.grad_accum, 1)
    total = job.optim.max_steps or math.ceil(steps_per_epoch * (job.optim.epochs or 1.0))
    return steps_per_epoch, total


# ---------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["optim.batch_size=8", "peft.method=lora"]`` into a nested dict.

    Values are parsed as YAML scalars or flow collections (``8`` -> int, ``[a, b]`` -> list), then typed by
    the schema.
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise JobError(f"Override '{item}' is not of the form key=value, e.g. optim.batch_size=8.")
        value = load_yaml(raw, f"Override '{item}': the value") if raw.strip() else None
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise JobError(f"Override '{item}' sets a key below '{part}', which is not a section.")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_job_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a job YAML file: UTF-8, safe loader, no duplicate keys, bounded alias expansion."""
    return read_job_yaml(path)


def build_job(raw: dict[str, Any], source: str = "<job>") -> JobSpec:
    """Validate a job dict, turning schema errors into one :class:`JobError` that names every bad key."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe_error(err) for err in exc.errors()]
        raise JobError(f"Job '{source}' is invalid:\n  - " + "\n  - ".join(lines)) from None


def load_job(path: str | os.PathLike, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job file."""
    raw = merge(read_job_file(path), parse_overrides(overrides or []))
    return build_job(raw, str(path))


def job_to_yaml(job: JobSpec) -> str:
    """The job as YAML, with every default written out, ready for ``shoulders train``."""
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)


def _describe_error(err: dict[str, Any]) -> str:
    loc = [str(part) for part in err["loc"] if not str(part).startswith("function-")]
    loc = [part for i, part in enumerate(loc) if not (part in SOURCE_TAGS and i >= 2 and loc[i - 2] == "data")]  # union tags
    key = ".".join(loc) or "(job)"
    if err["type"] == "extra_forbidden":
        valid = sorted(_fields_at(loc[:-1]))
        nearest = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f" Did you mean '{'.'.join(loc[:-1] + nearest)}'?" if nearest else ""
        return f"unknown key '{key}'.{hint} Valid keys here: {', '.join(valid)}."
    if err["type"] == "missing":
        return f"missing required key '{key}'."
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and key == "(job)":
        return msg
    return f"'{key}': {msg} (got {err.get('input')!r})."


def _fields_at(path: list[str]) -> set[str]:
    model: type[BaseModel] = JobSpec
    for part in path:
        field = model.model_fields.get(part)
        found = _model_in(getattr(field, "annotation", None))
        if found is None:
            return set()
        model = found
    return set(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The schema section an annotation names, also inside a union (``data.train``: a path or a mapping)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def field_docs(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field, for ``shoulders validate --explain``."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(field_docs(annotation, f"{prefix}{name}."))
        else:
            default = "required" if field.is_required() else repr(field.default)
            rows.append((f"{prefix}{name}", default, field.description or ""))
    return rows
