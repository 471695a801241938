"""The transfer report of a search: ``tune_results.csv``, ``best_job.yaml``, ``report.md`` and PNG plots.

Everything is written to a temporary name and renamed into place. The recommendation uses the usual
terms: feature extraction (every pre-trained block frozen), light fine-tuning (most blocks frozen, top ones
learn), full fine-tuning (every block learns), or parameter-efficient fine-tuning (adapters).
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any, TextIO

from cluster.run.report_files import save_fig
from cluster.run.forgetting import forgetting_lines
from cluster.tune.evidence import recommendation
from cluster.tune.space import tune_metric
from engine.checkpoints.atomic import write_atomic
from engine.config.schema import JobSpec, job_to_yaml

CSV_FIELDS = [
    "rank", "trial_id", "final", "best", "best_step", "iterations", "last_step", "planned_steps", "stopped_early",
    "forgetting", "drift", "train_val_gap", "error", "command",
]


def write_results_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """One row per trial, best first: each override as its own column, then the outcome columns."""
    keys = sorted({k for r in rows for k in r["overrides"]})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["rank", "trial_id", *keys, *CSV_FIELDS[2:]], extrasaction="ignore")
    writer.writeheader()
    for rank, row in enumerate(rows, 1):
        writer.writerow({**row, **row["overrides"], "rank": rank})
    return write_atomic(path, buffer.getvalue())


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
    return write_atomic(path, header + job_to_yaml(job))


def plot_results(out_dir: Path, rows: list[dict[str, Any]], histories: dict[str, list[dict[str, Any]]], metric: str,
                 depth: int | None, chance: float | None = None, mode: str = "max") -> list[Path]:
    """PNG plots: the metric against freeze depth and against backbone LR ratio, and learning curves.

    The scatter plots show every trial twice: at the budget all of them reached (equal budget; ASHA stops
    trials at different steps) and at its best within its own budget (steps written beside it). Trials for
    which the LR ratio means nothing (fully frozen backbone, adapters only) are left out of its plot. The
    chosen trial is a star; ``chance`` (the better of chance and majority, for accuracy) is a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cluster.tune.evidence import best_up_to, trial_strategy

    scored = [r for r in rows if r["best"] is not None]
    if not scored:
        return []
    chosen = rows[0]["trial_id"]
    equal_step = min(int(r.get("last_step") or 0) for r in scored)
    paths = []
    for key, name, log_x in (("finetune.freeze_depth", "metric_vs_freeze_depth.png", False),
                             ("finetune.backbone_lr_ratio", "metric_vs_lr_ratio.png", True)):
        kept = [r for r in scored if key != "finetune.backbone_lr_ratio"
                or trial_strategy(r, depth)[0] not in ("feature extraction", "parameter-efficient fine-tuning")]
        points = [(resolve_value(key, r["overrides"].get(key), depth), r) for r in kept]
        points = [(x, r) for x, r in points if x is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        at_equal = [(x, best_up_to(histories.get(r["trial_id"], []), metric, mode, equal_step)) for x, r in points]
        at_equal = [(x, y) for x, y in at_equal if y is not None]
        if at_equal:
            ax.scatter(*zip(*at_equal), facecolors="none", edgecolors="tab:blue", s=60, label=f"every trial at step {equal_step} (equal budget)")
        for stopped, marker, label in ((False, "o", "best in its own budget, ran to the end"), (True, "x", "best in its own budget, stopped early (ASHA)")):
            sel = [(x, r) for x, r in points if bool(r["stopped_early"]) == stopped]
            if sel:
                ax.scatter([x for x, _ in sel], [r["best"] for _, r in sel], marker=marker, color="tab:orange", label=label)
        for x, r in points:
            ax.annotate(f"{r.get('last_step')} steps", (x, r["best"]), fontsize=6, xytext=(4, 3), textcoords="offset points")
            if r["trial_id"] == chosen:
                ax.scatter([x], [r["best"]], marker="*", s=220, color="tab:red", zorder=3, label=f"chosen trial {chosen}")
        _chance_and_limits(ax, [y for _, y in at_equal] + [r["best"] for _, r in points], chance, metric)
        if log_x:
            ax.set_xscale("log")
        dropped = len(scored) - len(kept)
        ax.set_title(f"{len(points)} trials" + (f"; {dropped} left out: fully frozen or adapter-only, the ratio means nothing there" if dropped else ""), fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        fig.tight_layout()
        paths.append(save_fig(fig, out_dir / name))
        plt.close(fig)
    curves = scored[:5] + [r for r in scored[5:] if r["trial_id"] == chosen]
    fig, ax = plt.subplots(figsize=(7, 4.0 + 0.22 * len(curves)))
    values = []
    for row in curves:
        curve = [(h["step"], h[metric]) for h in histories.get(row["trial_id"], []) if h.get(metric) is not None]
        if curve:
            values += [y for _, y in curve]
            mine = row["trial_id"] == chosen
            ax.plot(*zip(*curve), marker=".", linewidth=2.5 if mine else 1.2, label=("chosen " if mine else "") + legend_label(row))
    _chance_and_limits(ax, values, chance, metric)
    ax.axvline(equal_step, color="gray", linewidth=0.8, linestyle=":", label=f"step {equal_step}: every trial got this far")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    fig.tight_layout()
    paths.append(save_fig(fig, out_dir / "learning_curves.png"))
    plt.close(fig)
    return paths


SHORT_KEYS = {"finetune.freeze_depth": "depth", "finetune.backbone_lr_ratio": "lr_ratio", "finetune.head_lr": "head_lr",
              "finetune.strategy": "strategy", "peft.method": "peft"}


def legend_label(row: dict[str, Any]) -> str:
    """A trial's id and every setting it varies, short but whole: ``ab12_00003: head_lr=0.0012 lr_ratio=0.31 depth=2``."""
    def show(value: Any) -> str:
        return f"{value:.2g}" if isinstance(value, float) else str(value)

    settings = " ".join(f"{SHORT_KEYS.get(k, k)}={show(v)}" for k, v in sorted(row["overrides"].items()))
    return f"{row['trial_id']}: {settings}" if settings else row["trial_id"]


def _chance_and_limits(ax: Any, values: list[float], chance: float | None, metric: str) -> None:
    """The chance line, and for metrics in 0..1 a y range of at least 0.2 that includes it, so noise
    around chance does not fill the plot like structure."""
    from engine.safeguards.transfer import PROPORTION_METRICS

    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance / majority class {chance:.3f}")
        values = values + [chance]
    if values and metric.removeprefix("val_") in PROPORTION_METRICS:
        low, high = min(values), max(values)
        pad = max(0.2 - (high - low), 0.0) / 2 + 0.02
        ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))


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
    from cluster.run.scratch_twin import verdict_section

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
        lines += forgetting_lines(best, best_job)
        if best.get("train_val_gap") is not None:
            lines.append(f"- train/validation loss gap (last evaluation): {best['train_val_gap']:.4f}")
        lines += ["", *verdict_section(verdict), "## Recommendation", ""]
        if verdict is not None and verdict[0].verdict == "no_signal":
            lines += [f"None: {verdict[0].advice}", ""]
        else:
            from cluster.tune.evidence import compare_strategies, recommendation_lines
            from cluster.tune.space import tune_mode

            num_val = getattr(outcome, "validation_rows", None)
            comparisons = compare_strategies(rows, outcome.histories, metric, tune_mode(job), depth, num_val)
            lines += recommendation_lines(name, advice, comparisons, metric, num_val)
            if verdict is not None and verdict[0].flagged:
                lines += [f"But: {verdict[0].advice}", ""]
    lines += ["## Trials (chosen first, then best first)" if getattr(outcome, "note", None) else "## Trials (best first)", "", f"| rank | trial | overrides | best {metric} | final | evals | stopped early | forgetting (or drift) |",
              "|---|---|---|---|---|---|---|---|"]
    for rank, r in enumerate(rows, 1):
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {rank} | {r['trial_id']} | `{r['command']}` | {fmt(r['best'])} | {fmt(r['final'])} | {r['iterations']} | "
                     f"{'yes' if r['stopped_early'] else 'no'} | {moved(r)} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return write_atomic(out_dir / "report.md", "\n".join(lines) + "\n")


def moved(row: dict[str, Any]) -> str:
    """A trial's forgetting (on the retention set), else its drift on target rows marked as such, else ``-``."""
    if row.get("forgetting") is not None:
        return f"{row['forgetting']:.4f}"
    return f"drift {row['drift']:.4f}" if row.get("drift") is not None else "-"


def print_ranked(rows: list[dict[str, Any]], metric: str, stream: TextIO | None = None) -> None:
    """The ranked trials as a table: on a terminal a rich table whose cells wrap at its width; written to a file
    or a pipe, plain text lines never cut (the overrides, the widest column, last and whole)."""
    stream = stream or sys.stdout
    columns = ["rank", "trial", f"best {metric}", "evals", "stopped early", "forgetting (or drift)", "overrides"]
    body = [[str(rank), r["trial_id"], "-" if r["best"] is None else f"{r['best']:.4f}", str(r["iterations"]),
             "yes" if r["stopped_early"] else "no", moved(r), r["command"]] for rank, r in enumerate(rows, 1)]
    if not stream.isatty():
        from cluster.run.summary import text_table

        fixed = text_table(columns[:-1], [row[:-1] for row in body])
        width = max(map(len, fixed))
        last = [columns[-1], "-" * len(columns[-1]), *(row[-1] for row in body)]
        print("shoulders tune: trials, best first", file=stream)
        print("\n".join(f"{line.ljust(width)}  {tail}" for line, tail in zip(fixed, last)), file=stream, flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="shoulders tune: trials, best first")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in body:
        table.add_row(*row)
    Console(file=stream).print(table)
