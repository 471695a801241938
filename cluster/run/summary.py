"""The results table printed at the end of ``shoulders train``."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from cluster.run.console import COUNTS, metric_keys
from engine.config.schema import JobSpec


def text_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A plain-text table, never cut: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(columns), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]


def summary_table(summary: Any, scratch: Any | None = None) -> list[str]:
    """Best validation and test metrics of the run (and of the from-scratch twin) as table lines."""
    keys = metric_keys(summary.best) + [f"test_{k}" for k in (summary.test or {}) if f"val_{k}" not in COUNTS]
    rows = []
    for label, run in [("pre-trained", summary)] + ([("from scratch", scratch)] if scratch else []):
        values = {**run.best, **{f"test_{k}": v for k, v in (run.test or {}).items()}}
        rows.append([label, *(f"{values[k]:.4f}" if isinstance(values.get(k), (int, float)) else "-" for k in keys)])
    return text_table(["model", *keys], rows)


def print_summary(job: JobSpec, summary: Any, scratch: Any | None = None) -> None:
    """Best validation and test metrics (and the from-scratch comparison when it ran), whole at any width."""
    print(f"shoulders: {job.name}")
    print("\n".join(summary_table(summary, scratch)), flush=True)
    console = Console(soft_wrap=True, highlight=False)  # soft wrap: no line is cut or folded at 80 columns
    if summary.export_dir:
        console.print(f"exported model: {summary.export_dir}")
    console.print(f"metrics: {job.output_dir / 'metrics.json'}")
    from cluster.run.forgetting import forgetting_lines

    for line in forgetting_lines(summary.history[-1] if getattr(summary, "history", None) else {}, job):
        console.print(line.removeprefix("- "))  # forgetting of the source and drift on target data, with units
    if scratch and summary.test and scratch.test:
        metric = job.eval_metric
        from engine.safeguards.transfer import gain_of

        gain = gain_of(summary.test.get(metric, 0.0), scratch.test.get(metric, 0.0), job.eval_mode)
        better = "higher" if job.eval_mode == "max" else "lower"
        console.print(f"transfer gain on test {metric}: {gain:+.4f} (how much better pre-trained is than scratch; {better} {metric} is better)")
