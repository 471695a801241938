"""The transfer verdict on the driver: the from-scratch twin with its own learning rate, the chance and
majority baselines from the labels, and the verdict printed and written to ``transfer.json``.

``shoulders train`` (with ``--compare-scratch`` or ``safeguards.compare_scratch``) and ``shoulders tune``
call :func:`train_scratch_twin` and :func:`judge_run`; the judging itself is ``engine.safeguards.transfer``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.ingest.rows import open_dataset
from cluster.ingest.splits import DataInfo, SplitInfo
from engine.config.schema import JobSpec
from engine.safeguards.transfer import Baselines, TransferVerdict, class_baselines, judge_transfer, scratch_job

log = logging.getLogger(__name__)
VERDICT_FILE = "transfer.json"


# ---------------------------------------------------------------------------------------------------
# Baselines from the labels


def validation_rows(job: JobSpec, info: DataInfo) -> int | None:
    """Rows the trials are ranked on: the validation split, or the share held out of the training rows."""
    if "validation" in info.splits:
        return info.splits["validation"].num_rows
    train = info.splits["train"].num_rows
    return round(train * job.data.validation_fraction) if train else None


def label_counts(job: JobSpec, split: SplitInfo, labels: list[str]) -> dict[str, int]:
    """Rows per class of a split (every class of ``labels``, zeros included); integer labels are indices."""
    column = open_dataset(split.files, split.format).to_table(columns=[job.data.label_column]).column(0).to_pylist()
    counts = dict.fromkeys(labels, 0)
    for value in column:
        if value is None:
            continue
        name = str(value)
        if name not in counts and name.lstrip("-").isdigit() and 0 <= int(name) < len(labels):
            name = labels[int(name)]
        if name in counts:
            counts[name] += 1
    return counts


def run_baselines(job: JobSpec, info: DataInfo, evaluated: str) -> Baselines | None:
    """Chance and majority class of a classification job (None for other tasks, or unreadable labels):
    the majority class from the training labels, its accuracy on the ``evaluated`` split's labels."""
    if not info.labels:  # only classification tasks have labels
        return None
    try:
        train = label_counts(job, info.splits["train"], info.labels)
        scored = label_counts(job, info.splits[evaluated], info.labels) if evaluated in info.splits else None
    except Exception as exc:  # noqa: BLE001  (remote or odd files: the verdict goes on without baselines)
        log.warning("no chance/majority baselines: the labels could not be read (%s)", exc)
        return None
    return class_baselines(train, scored)


# ---------------------------------------------------------------------------------------------------
# The scratch twin and its learning rate


@dataclass
class ScratchSearch:
    """How the scratch twin's learning rate was chosen: each candidate's best validation metric after a
    short run of ``steps`` optimizer steps, and the winner."""

    metric: str
    candidates: list[float]
    scores: list[float | None] = field(default_factory=list)
    steps: int | None = None
    total_steps: int | None = None
    chosen: float | None = None

    def lines(self) -> list[str]:
        """One line per fact, for the terminal and report.md."""
        if len(self.candidates) == 1:
            return [f"scratch twin learning rate {self.chosen:.3g} (safeguards.scratch_lrs has one value: no search)"]
        tried = ", ".join(f"{lr:.3g} -> {'failed' if s is None else f'{s:.4f}'}" for lr, s in zip(self.candidates, self.scores))
        return [f"scratch twin learning rate {self.chosen:.3g}, chosen on validation {self.metric} after {self.steps} of "
                f"{self.total_steps} steps per candidate: {tried}"]


def candidate_lrs(job: JobSpec) -> list[float]:
    """The learning rates the scratch twin tries: ``safeguards.scratch_lrs``, else the job's head LR x 1/3, 1, 3."""
    if job.safeguards.scratch_lrs:
        return list(job.safeguards.scratch_lrs)
    return [job.finetune.head_lr / 3, job.finetune.head_lr, job.finetune.head_lr * 3]


def train_scratch_twin(job: JobSpec, info: DataInfo, out_dir: Path) -> tuple[Any, ScratchSearch]:
    """Train the fair scratch twin of ``job`` (:func:`engine.safeguards.guards.scratch_job`) in ``out_dir``.

    With several candidate LRs, each first trains ``safeguards.scratch_search_fraction`` of the step budget
    (no export) in ``out_dir/lr-<i>``; the best on validation then trains the full budget. With a fraction
    of 1 the best candidate's run is the twin. Returns the twin's ``RunSummary`` and the search record.
    """
    from cluster.run.trainer import run_training
    from cluster.tune.space import step_budget

    metric, mode = job.eval_metric, job.eval_mode
    lrs = candidate_lrs(job)
    search = ScratchSearch(metric=f"val_{metric}", candidates=lrs)
    if len(lrs) == 1:
        search.chosen = lrs[0]
        return run_training(scratch_job(job, str(out_dir), lrs[0]), info), search
    _, total = step_budget(scratch_job(job, str(out_dir)), info.splits["train"].num_rows)
    fraction = job.safeguards.scratch_search_fraction
    search.total_steps = total
    search.steps = total if fraction >= 1 else max(1, math.ceil(total * fraction))
    runs = []
    for i, lr in enumerate(lrs):
        candidate = scratch_job(job, str(out_dir / f"lr-{i}"), lr, name_suffix=f"scratch-lr{i}")
        if fraction < 1:
            candidate = candidate.model_copy(update={
                "optim": candidate.optim.model_copy(update={"max_steps": search.steps, "epochs": None}),
                "output": candidate.output.model_copy(update={"export": "none"}),
            })
        try:
            summary = run_training(candidate, info)
            score = summary.best.get(search.metric)
        except Exception as exc:  # noqa: BLE001  (a diverging LR may fail; the others still count)
            log.warning("scratch twin candidate lr %.3g failed: %s", lr, exc)
            summary, score = None, None
        runs.append(summary)
        search.scores.append(score)
    scored = [(s, i) for i, s in enumerate(search.scores) if s is not None and not math.isnan(s)]
    best = (max if mode == "max" else min)(scored)[1] if scored else len(lrs) // 2
    search.chosen = lrs[best]
    log.info("%s", search.lines()[0])
    if fraction >= 1 and runs[best] is not None:
        return runs[best], search
    return run_training(scratch_job(job, str(out_dir), search.chosen), info), search


# ---------------------------------------------------------------------------------------------------
# The verdict


def judge_run(
    job: JobSpec, info: DataInfo, pretrained_test: dict[str, float] | None, pretrained_best: dict[str, Any] | None = None,
    scratch: Any | None = None, search: ScratchSearch | None = None,
) -> TransferVerdict | None:
    """The verdict of a run on its test split (else on validation, from the best checkpoint's metrics),
    against the scratch twin's ``RunSummary`` when one ran; None when there is nothing to judge."""
    if pretrained_test:
        evaluated, pretrained, other = "test", pretrained_test, (scratch.test if scratch else None)
    elif pretrained_best:
        evaluated = "validation"
        pretrained = {k.removeprefix("val_"): v for k, v in pretrained_best.items() if k.startswith("val_")}
        other = {k.removeprefix("val_"): v for k, v in scratch.best.items() if k.startswith("val_")} if scratch else None
    else:
        return None
    metric = job.eval_metric
    if metric not in pretrained:
        return None
    baselines = run_baselines(job, info, evaluated)
    if other is None and baselines is None:
        return None
    n = info.splits[evaluated].num_rows if evaluated in info.splits else validation_rows(job, info)
    return judge_transfer(metric, job.eval_mode, pretrained, other, n, baselines, job.safeguards.min_gain, evaluated)


def verdict_lines(verdict: TransferVerdict, search: ScratchSearch | None = None) -> list[str]:
    """The verdict's lines, then how the scratch twin's learning rate was chosen."""
    return verdict.lines() + (search.lines() if search else [])


def verdict_section(verdict: tuple[Any, Any] | None) -> list[str]:
    """The transfer verdict of ``report.md``: its name, then every number it rests on."""
    if verdict is None:
        return ["## Transfer verdict", "", "Not judged: no test split (and no labels to compare with chance).", ""]
    first, *rest = verdict_lines(*verdict)
    extra = [] if verdict[0].scratch is not None else ["gain over scratch: not measured (set safeguards.compare_scratch: true)"]
    return ["## Transfer verdict", "", f"**{first}**", "", *[f"- {line}" for line in rest + extra], ""]


def print_verdict(verdict: TransferVerdict, search: ScratchSearch | None = None) -> None:
    """The verdict on the terminal: its name, then the numbers it rests on, indented."""
    first, *rest = verdict_lines(verdict, search)
    print(first + "".join(f"\n  {line}" for line in rest))


def write_verdict(out_dir: Path, verdict: TransferVerdict, search: ScratchSearch | None = None) -> Path:
    """``transfer.json`` in ``out_dir``: the verdict, its numbers and the scratch LR search (atomic write)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / VERDICT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**verdict.to_dict(), "scratch_lr_search": asdict(search) if search else None}, indent=1))
    os.replace(tmp, path)
    return path


def add_to_run_report(report: Path, verdict: TransferVerdict, search: ScratchSearch | None = None) -> Path | None:
    """Put the verdict section (as in the search's report) into a run's ``report.md``, replacing an earlier
    one; nothing when the run wrote no report."""
    from cluster.run.report_files import write_atomic

    if not report.is_file():
        return None
    text = report.read_text()
    head, found, rest = text.partition("## Transfer verdict")
    tail = rest[rest.index("\n## ") + 1:] if found and "\n## " in rest else ""
    section = "\n".join(verdict_section((verdict, search)))
    return write_atomic(report, head.rstrip("\n") + "\n\n" + section + ("\n" + tail if tail else ""))
