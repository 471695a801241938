"""``curves.png`` and ``report.md`` of every training run, in the look of the tune report (``cluster.tune.report``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.run.console import log_dir, metric_keys
from cluster.run.report_files import save_fig
from cluster.run.forgetting import forgetting_lines
from engine.checkpoints.atomic import write_atomic

CURVES = "curves.png"
REPORT = "report.md"
SAFEGUARD_KEYS = ("train_val_gap", "frozen_blocks", "retention_")
"""Prefixes of the safeguards' other per-evaluation numbers that the report lists (forgetting and drift come
first, named with their units: ``cluster.run.forgetting.forgetting_lines``)."""


def series(history: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of ``key`` over the evaluation history, where it was reported."""
    return [(row["step"], row[key]) for row in history if isinstance(row.get(key), (int, float)) and "step" in row]


def plot_curves(path: Path, history: list[dict[str, Any]], metric: str) -> Path:
    """Three panels against the optimizer step: train and validation loss, the validation metric, and
    each parameter group's learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, metric_ax, lr_ax) = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if points := series(history, key):
            loss_ax.plot(*zip(*points), marker=".", label=label)
    loss_ax.set_title("loss")
    metric_key = f"val_{metric}"
    if metric_key != "val_loss" and (points := series(history, metric_key)):
        metric_ax.plot(*zip(*points), marker=".", color="C2")
    metric_ax.set_title(f"validation {metric}")
    groups = sorted({k for row in history for k in row if k.startswith("lr_")})
    for key in groups:
        if points := series(history, key):
            lr_ax.plot(*zip(*points), marker=".", label=key.removeprefix("lr_"))
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))  # linear: the schedule may end at 0
    lr_ax.set_title("learning rate per parameter group")
    for ax in (loss_ax, metric_ax, lr_ax):
        ax.set_xlabel("optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    saved = save_fig(fig, path)
    plt.close(fig)
    return saved


def group_lines(layout: dict[str, Any], history: list[dict[str, Any]]) -> list[str]:
    """The parameter-group table: size and starting LR (from the workers' start) and the last LR reported."""
    last = history[-1] if history else {}
    rows = ["| group | parameters | initial LR | weight decay | LR at the last evaluation |", "|---|---|---|---|---|"]
    for group in layout.get("groups", []):
        final = last.get(f"lr_{group['name']}")
        rows.append(f"| {group['name']} | {group['params']:,} | {group['lr']:.3g} | {group['weight_decay']:g} | "
                    f"{'-' if final is None else f'{final:.3g}'} |")
    if len(rows) == 2:  # no start event: the groups the history names
        rows += [f"| {k.removeprefix('lr_')} | - | - | - | {v:.3g} |" for k, v in last.items() if k.startswith("lr_")]
    return rows


def write_run_report(job: Any, info: Any, summary: Any) -> tuple[Path, Path]:
    """Write ``curves.png`` and ``report.md`` into the run's output folder; returns their paths."""
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(out / CURVES, summary.history, job.eval_metric)
    layout = getattr(summary, "layout", None) or {}
    lines = [f"# Training report: {job.name}", ""]
    lines += [
        "## Job", "",
        f"- model: `{job.model.name}` ({job.model.task}); strategy `{job.finetune.strategy}`, peft `{job.peft.method}`, "
        f"freeze depth {job.finetune.freeze_depth}",
        f"- head LR {job.finetune.head_lr:g}, backbone LR ratio {job.finetune.backbone_lr_ratio:g}; "
        f"batch {job.optim.batch_size} x {job.scaling.num_workers} worker(s)",
    ]
    if layout:
        share = 100 * layout["trainable"] / max(layout["parameters"], 1)
        lines.append(f"- parameters: {layout['parameters']:,}, trainable {layout['trainable']:,} ({share:.1f}%); "
                     f"{layout['total_steps']} steps, evaluation every {layout['eval_every']}")
    lines += ["", "## Data", "", "| split | rows |", "|---|---|"]
    lines += [f"| {name} | {split.num_rows} |" for name, split in info.splits.items()]
    if info.labels:
        lines += ["", f"{len(info.labels)} labels: {', '.join(info.labels)}"]
    lines += ["", "## Parameter groups", "", *group_lines(layout, summary.history)]
    lines += ["", "## Results", "", f"- best validation (step {summary.best.get('step')}): "
              + ", ".join(f"{k} {summary.best[k]:.4f}" for k in metric_keys(summary.best))]
    if summary.test:
        lines.append("- test (exported model): " + ", ".join(f"{k} {v:.4f}" for k, v in summary.test.items()))
    if summary.export_dir:
        lines.append(f"- exported model: `{summary.export_dir}`")
    lines += ["", "## Safeguards", "", *safeguard_lines(summary.history, job)]  # the transfer verdict is added after the run
    lines += ["", "## Curves", "", f"![curves]({CURVES})", "", "## Logs", "",
              f"- driver and workers: `{log_dir(job.output_dir)}` (`driver.log`, `worker-<rank>.log`)",
              f"- metrics: `{out / 'metrics.json'}`; TensorBoard: `tensorboard --logdir {out}`" if job.tracking.tensorboard else
              f"- metrics: `{out / 'metrics.json'}`"]
    report = write_atomic(out / REPORT, "\n".join(lines) + "\n")
    return curves, report


def safeguard_lines(history: list[dict[str, Any]], job: Any = None) -> list[str]:
    """The safeguards' numbers at the last evaluation: forgetting of the source and drift on target data
    (with what they measure, given the ``job``), then the train/validation gap and the rest."""
    last = history[-1] if history else {}
    found = forgetting_lines(last, job) if job is not None else [
        f"- {k}: {last[k]:.4f}" for k in ("forgetting", "drift") if isinstance(last.get(k), (int, float))]
    found += [f"- {k}: {v:.4f}" for k, v in last.items() if k.startswith(SAFEGUARD_KEYS) and isinstance(v, (int, float))]
    return found or ["- no safeguard measured a problem worth a number at the last evaluation"]

