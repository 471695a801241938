"""The search space of ``shoulders tune`` and the resource rule, as pure functions (no Ray at import).

A ``tune.space`` entry maps a dotted job key to one domain; a trial is the base job plus one value per
key, typed and validated by the job schema, so ``shoulders train JOB k=v ...`` reruns it exactly.
"""

from __future__ import annotations

import json
import math
from typing import Any

from engine.config.schema import JobSpec, build_job, merge, parse_overrides, plan_steps
from engine.errors import JobError

TRIAL_CPUS = 0.01
"""CPUs reserved by each trial's driver function (0 is refused by Ray; the workers hold the real CPUs)."""
DEFAULT_STRATEGIES = ["full", "lora"]


def model_depth(job: JobSpec) -> int:
    """Number of blocks ``finetune.freeze_depth`` counts in the job's model (transformer blocks, a CNN's stages or
    blocks), as its modality reads them from its config.json (no torch)."""
    from cluster.modalities import modality_of
    from engine.models.loading import read_config_json

    depth = modality_of(job).block_count(read_config_json(job.model.name, job.model.revision))
    if depth:
        return depth
    raise JobError(f"model.name '{job.model.name}': cannot tell its number of blocks; give tune.space explicitly.")


def default_space(job: JobSpec, depth: int) -> dict[str, dict[str, list[Any]]]:
    """The space searched when ``tune.space`` is empty: how deep to freeze and how fast the backbone learns."""
    lr = job.finetune.head_lr
    return {
        "finetune.freeze_depth": {"randint": [0, depth]},
        "finetune.backbone_lr_ratio": {"loguniform": [0.01, 1.0]},
        "finetune.head_lr": {"loguniform": [lr / 3, lr * 3]},
        "finetune.strategy": {"choice": DEFAULT_STRATEGIES},
    }


def search_space(job: JobSpec, depth: int | None = None) -> dict[str, dict[str, list[Any]]]:
    """The job's ``tune.space``, or the default space (``depth`` is read from the model when not given)."""
    if job.tune.space:
        return dict(job.tune.space)
    return default_space(job, model_depth(job) if depth is None else depth)


def to_tune_domain(kind: str, values: list[Any]) -> Any:
    """One ``tune.space`` entry as a Ray Tune domain (``randint`` is inclusive here, exclusive in Tune)."""
    from ray import tune

    if kind == "choice":
        return tune.choice(values)
    if kind == "grid":
        return tune.grid_search(values)
    if kind == "uniform":
        return tune.uniform(*values)
    if kind == "loguniform":
        return tune.loguniform(*values)
    if kind == "randint":
        return tune.randint(values[0], values[1] + 1)
    raise ValueError(f"unknown search domain {kind}")


def override_args(overrides: dict[str, Any]) -> list[str]:
    """``{"finetune.freeze_depth": 2}`` -> ``["finetune.freeze_depth=2"]``, as typed on the command line."""
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in sorted(overrides.items())]


def trial_job(base_raw: dict[str, Any], overrides: dict[str, Any], name: str | None = None, out_dir: str | None = None) -> JobSpec:
    """The job a trial runs: base job + overrides (and its own name and output folder)."""
    raw = merge(base_raw, parse_overrides(override_args(overrides)))
    if name:
        raw["name"] = name
    if out_dir:
        raw = merge(raw, {"output": {"dir": out_dir}})
    return build_job(raw, f"trial {override_args(overrides)}")


def base_point(job: JobSpec, space: dict[str, dict[str, list[Any]]], depth: int | None = None) -> dict[str, Any] | None:
    """The base job's own value of every searched key, when each lies inside its domain (else ``None``).

    ``shoulders tune`` runs it as the first trial (``tune.include_base``), so the search starts from the job
    as written and its best trial is at least as good on validation. Grid spaces enumerate their own points.
    ``finetune.freeze_depth`` counts as the number of blocks it freezes on a model of ``depth`` blocks.
    """
    values = job.model_dump(mode="json")
    point = {}
    for key, domain in space.items():
        (kind, bounds), = domain.items()
        value: Any = values
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        if key == "finetune.freeze_depth" and depth is not None:
            from engine.models.blocks import resolve_freeze_depth

            value = resolve_freeze_depth(value, depth)
        if kind == "grid" or not (value in bounds if kind == "choice" else _in_range(value, bounds, integer=kind == "randint")):
            return None
        point[key] = value
    return point


def _in_range(value: Any, bounds: list[Any], integer: bool) -> bool:
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    return number and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]


def sample_point(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """One point of the space (the first value or the low end of each domain), to validate keys early."""
    return {key: next(iter(domain.values()))[0] for key, domain in space.items()}


def check_space(base_raw: dict[str, Any], space: dict[str, dict[str, list[Any]]]) -> None:
    """Every searched key is a job key whose values the schema accepts; raised before Ray starts."""
    for key in space:
        if key.split(".")[0] in ("tune", "output", "name"):
            raise JobError(f"tune.space.{key}: '{key.split('.')[0]}' cannot be searched; search model/data/finetune/peft/optim/... keys.")
    for key, domain in space.items():
        for value in next(iter(domain.values()))[:8]:
            try:
                trial_job(base_raw, {key: value})
            except JobError as exc:
                raise JobError(f"tune.space.{key}: value {value!r} does not make a valid job: {exc}") from None


def compute_concurrency(
    cluster_cpus: float, cluster_gpus: float, num_workers: int, cpus_per_worker: float, use_gpu: bool,
    data_cpus: float = 1.0, trial_cpus: float = TRIAL_CPUS, requested: int | None = None,
) -> int:
    """How many trials can run at once without starving each other or their Ray Data pipelines.

    Every running trial holds ``trial_cpus`` plus its workers' CPUs (and one GPU per worker), and
    ``data_cpus`` in its placement group for its Ray Data pipelines (see ``cluster.tune.search.trial_resources``).
    Logical CPUs are the cluster's real ones (an embedded local Ray has the machine's cores): on 2 cores
    one 2-worker trial at a time trains faster than two trials sharing the cores (measured: an epoch took
    73-88 s with two trials at once against ~20 s alone).

    Raises:
        JobError: not even one trial fits.
    """
    per_trial = trial_cpus + num_workers * cpus_per_worker
    fits = math.floor(cluster_cpus / (per_trial + data_cpus) + 1e-9)
    if use_gpu:
        fits = min(fits, math.floor(cluster_gpus / num_workers + 1e-9))
    if fits < 1:
        raise JobError(
            f"one trial needs {per_trial:g} CPUs ({num_workers} workers x scaling.cpus_per_worker {cpus_per_worker:g})"
            + (f" and {num_workers} GPUs" if use_gpu else "")
            + f" plus tune.data_cpus {data_cpus:g} for its Ray Data pipelines, but the cluster has {cluster_cpus:g} CPUs"
            + (f" and {cluster_gpus:g} GPUs" if use_gpu else "")
            + ". Lower scaling.num_workers or scaling.cpus_per_worker, or tune.data_cpus."
        )
    return min(fits, requested) if requested else fits


def step_budget(job: JobSpec, num_train_rows: int) -> tuple[int, int]:
    """(optimizer steps between evaluations, total optimizer steps) of a job: ASHA's time unit and ``max_t``."""
    steps_per_epoch, total = plan_steps(job, num_train_rows, job.scaling.num_workers)
    return job.eval.every_n_steps or steps_per_epoch, total


def tune_metric(job: JobSpec) -> str:
    return f"val_{job.tune.metric or job.eval_metric}"


def tune_mode(job: JobSpec) -> str:
    if job.tune.mode:
        return job.tune.mode
    if job.tune.metric:
        probe = job.model_copy(update={"eval": job.eval.model_copy(update={"metric": job.tune.metric, "mode": None})})
        return probe.eval_mode
    return job.eval_mode


def keep_incumbent(
    rows: list[dict[str, Any]], base: dict[str, Any] | None, mode: str, num_val: int | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Rows (ranked best first) with the base job's own trial moved to the top when no trial beats it on
    validation by more than the noise of the validation set, and the sentence that says so.

    The noise is one standard error of the difference of two proportions on ``num_val`` rows, so it applies
    to metrics in 0..1 that are better higher (accuracy, F1). On a small validation split a trial ahead by
    a few rows is ahead by chance, and switching to it gives a worse model as often as a better one.
    """
    if not rows or base is None or not num_val or mode != "max":
        return rows, None
    incumbent = next((r for r in rows if r["overrides"] == base and r["best"] is not None), None)
    top = rows[0]
    if incumbent is None or incumbent is top or top["best"] is None or not (0 <= incumbent["best"] <= 1 and 0 <= top["best"] <= 1):
        return rows, None
    p, q = top["best"], incumbent["best"]
    noise = math.sqrt((p * (1 - p) + q * (1 - q)) / num_val)
    if p - q > noise:
        return rows, None
    note = (f"kept the job's own values (trial {incumbent['trial_id']}): the highest-scoring trial {top['trial_id']} is ahead by "
            f"{p - q:.4f} on validation, within the noise of {num_val} validation rows ({noise:.4f})")
    return [incumbent] + [r for r in rows if r is not incumbent], note
