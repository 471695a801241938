"""The transfer report of a search: ``tune_results.csv``, ``best_job.yaml``, ``report.md`` and PNG plots.

Everything is written to a temporary name and renamed into place. The recommendation uses the usual
terms: feature extraction (every pre-trained block frozen), light fine-tuning (most blocks frozen, top ones
learn), full fine-tuning (every block learns), or parameter-efficient fine-tuning (adapters).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from engine.config import JobSpec, job_to_yaml

CSV_FIELDS = [
    "rank", "trial_id", "final", "best", "best_step", "iterations", "last_step", "planned_steps", "stopped_early",
    "forgetting", "train_val_gap", "error", "command",
]


def _write_atomic(path: Path, data: str | bytes) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def write_results_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """One row per trial, best first: each override as its own column, then the outcome columns."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["rank", "trial_id", *keys, *CSV_FIELDS[2:]], extrasaction="ignore")
    writer.writeheader()
    for rank, row in enumerate(rows, 1):
        writer.writerow({**row, **row["overrides"], "rank": rank})
    return _write_atomic(path, buffer.getvalue())


def read_results_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a ``tune_results.csv`` (strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_best_job(path: Path, best_job: JobSpec, out_dir: Path) -> Path:
    """The best trial as a ready-to-run job (``shoulders train best_job.yaml``), writing to ``out_dir/best``."""
    job = best_job.model_copy(update={
        "name": f"{best_job.name}-best",
        "output": best_job.output.model_copy(update={"dir": str(out_dir / "best")}),
    })
    header = f"# The best trial of `shoulders tune` on '{best_job.name}'. Run it with: shoulders train {path.name}\n"
    return _write_atomic(path, header + job_to_yaml(job))


def recommendation(n_frozen: int, depth: int, peft_method: str) -> tuple[str, str]:
    """(strategy name, advice) for the chosen freeze depth and PEFT method."""
    if peft_method != "none":
        return "parameter-efficient fine-tuning", f"adapters ({peft_method}) on the top {depth - n_frozen} of {depth} blocks; the base weights stay frozen."
    if n_frozen >= depth:
        return "feature extraction", "freeze the whole backbone and train the head: the pre-trained features already fit this task."
    if n_frozen == 0:
        return "full fine-tuning", "every block learns: the task differs enough from the source that all layers adapt."
    return "light fine-tuning", f"freeze the bottom {n_frozen} of {depth} blocks and fine-tune the top {depth - n_frozen} with the head."


def plot_results(out_dir: Path, rows: list[dict[str, Any]], histories: dict[str, list[dict[str, Any]]], metric: str,
                 depth: int | None) -> list[Path]:
    """PNG plots: best metric against freeze depth and against backbone LR ratio; learning curves of the top trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["best"] is not None]
    paths = []
    for key, name, log_x in (("finetune.freeze_depth", "metric_vs_freeze_depth.png", False),
                             ("finetune.backbone_lr_ratio", "metric_vs_lr_ratio.png", True)):
        points = [(resolve_value(key, r["overrides"].get(key), depth), r["best"], r["stopped_early"]) for r in scored]
        points = [p for p in points if p[0] is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for stopped, marker, label in ((False, "o", "ran to the end"), (True, "x", "stopped early (ASHA)")):
            sel = [p for p in points if p[2] == stopped]
            if sel:
                ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=marker, label=label)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save_fig(fig, out_dir / name))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for row in scored[:5]:
        curve = [(h["step"], h[metric]) for h in histories.get(row["trial_id"], []) if h.get(metric) is not None]
        if curve:
            ax.plot(*zip(*curve), marker=".", label=f"{row['trial_id']}: {row['command'][:40]}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(_save_fig(fig, out_dir / "learning_curves.png"))
    plt.close(fig)
    return paths


def _save_fig(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return _write_atomic(path, buffer.getvalue())


def resolve_value(key: str, value: Any, depth: int | None) -> float | None:
    """A searched value as a number for plotting (``all`` and negative freeze depths resolved)."""
    if value is None:
        return None
    if key == "finetune.freeze_depth" and depth is not None:
        from engine.models.blocks import resolve_freeze_depth

        return float(resolve_freeze_depth(value, depth))
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def write_report(
    out_dir: Path, job: JobSpec, outcome: Any, depth: int | None, test: dict[str, float] | None,
    verdict: Any | None, plots: list[Path], elapsed_s: float | None = None, job_path: str = "JOB.yaml",
) -> Path:
    """``report.md``: the chosen strategy, freeze depth and LR ratio, gain over scratch, forgetting, train/val
    gap, the recommendation and the ranked trials."""
    from cluster.tune import tune_metric
    from engine.models.blocks import resolve_freeze_depth

    metric = tune_metric(job)
    rows = outcome.trials
    lines = [f"# Transfer report: {job.name}", ""]
    stopped = sum(1 for r in rows if r["stopped_early"])
    timing = f" in {elapsed_s / 60:.1f} min" if elapsed_s else ""
    errored = sum(1 for r in rows if r["error"])
    lines += [f"{len(rows)} trials{timing}; the scheduler ({job.tune.scheduler}) stopped {stopped} of them early"
              + (f"; {errored} failed (see the error column of tune_results.csv)." if errored else "."), ""]
    best_job = outcome.best_job
    if best_job is None:
        lines += ["No trial reported a metric; see the errors in tune_results.csv.", ""]
    else:
        best = rows[0]
        n_frozen = resolve_freeze_depth(best_job.finetune.freeze_depth, depth) if depth else None
        name, advice = recommendation(n_frozen, depth, best_job.peft.method) if depth else ("?", "")
        lines += [
            "## Best trial", "",
            *([f"- {outcome.note}"] if getattr(outcome, "note", None) else []),
            f"- trial `{best['trial_id']}`: `shoulders train {job_path} {best['command']}` (or `shoulders train best_job.yaml`)",
            f"- strategy: **{name}** (finetune.strategy `{best_job.finetune.strategy}`, peft `{best_job.peft.method}`)",
            f"- freeze depth: {best_job.finetune.freeze_depth}" + (f" = {n_frozen} of {depth} blocks frozen" if depth else ""),
            f"- backbone LR ratio: {best_job.finetune.backbone_lr_ratio:.4g} (head LR {best_job.finetune.head_lr:.3g})",
            f"- best {metric}: {best['best']:.4f} at step {best['best_step']}",
        ]
        if test:
            lines.append("- test: " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
        if best.get("forgetting") is not None:
            from engine.safeguards import forgetting_measure

            unit = {"cka": "1 - linear CKA of pooled backbone features vs the pre-trained model; 0 = unchanged, 1 = unrelated",
                    "lm_loss": "increase of the source LM loss in nats"}[forgetting_measure(best_job)]
            lines.append(f"- forgetting delta (retention set, last evaluation vs step 0; {unit}): {best['forgetting']:.4f}")
        if best.get("train_val_gap") is not None:
            lines.append(f"- train/validation loss gap (last evaluation): {best['train_val_gap']:.4f}")
        lines += ["", *verdict_section(verdict)]
        lines += ["## Recommendation", "", f"**{name}**: {advice}", ""]
        if verdict is not None and verdict[0].flagged:
            lines += [f"But: {verdict[0].advice}", ""]
    lines += ["## Trials (chosen first, then best first)" if getattr(outcome, "note", None) else "## Trials (best first)", "", f"| rank | trial | overrides | best {metric} | final | evals | stopped early | forgetting |",
              "|---|---|---|---|---|---|---|---|"]
    for rank, r in enumerate(rows, 1):
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {rank} | {r['trial_id']} | `{r['command']}` | {fmt(r['best'])} | {fmt(r['final'])} | {r['iterations']} | "
                     f"{'yes' if r['stopped_early'] else 'no'} | {fmt(r['forgetting'])} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return _write_atomic(out_dir / "report.md", "\n".join(lines) + "\n")


def verdict_section(verdict: tuple[Any, Any] | None) -> list[str]:
    """The transfer verdict of ``report.md``: its name, then every number it rests on (``cluster.transfer``)."""
    if verdict is None:
        return ["## Transfer verdict", "", "Not judged: no test split (and no labels to compare with chance).", ""]
    from cluster.transfer import verdict_lines

    first, *rest = verdict_lines(*verdict)
    extra = [] if verdict[0].scratch is not None else ["gain over scratch: not measured (set safeguards.compare_scratch: true)"]
    return ["## Transfer verdict", "", f"**{first}**", "", *[f"- {line}" for line in rest + extra], ""]


def print_ranked(rows: list[dict[str, Any]], metric: str) -> None:
    """The ranked trials as a table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="shoulders tune: trials, best first")
    for column in ("rank", "trial", "overrides", f"best {metric}", "evals", "stopped early", "forgetting"):
        table.add_column(column)
    for rank, r in enumerate(rows, 1):
        table.add_row(str(rank), r["trial_id"], r["command"], "-" if r["best"] is None else f"{r['best']:.4f}",
                      str(r["iterations"]), "yes" if r["stopped_early"] else "no",
                      "-" if r["forgetting"] is None else f"{r['forgetting']:.4f}")
    Console(width=160).print(table)
