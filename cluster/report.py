"""The results table printed at the end of ``shoulders train``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from engine.config import JobSpec


def print_summary(job: JobSpec, summary: Any, scratch: Any | None = None) -> None:
    """Best validation and test metrics (and the from-scratch comparison when it ran)."""
    table = Table(title=f"shoulders: {job.name}")
    table.add_column("model")
    keys = [k for k in summary.best if k.startswith("val_")] + [f"test_{k}" for k in (summary.test or {})]
    for key in keys:
        table.add_column(key, justify="right")
    rows = [("pre-trained", summary)] + ([("from scratch", scratch)] if scratch else [])
    for label, run in rows:
        values = {**run.best, **{f"test_{k}": v for k, v in (run.test or {}).items()}}
        table.add_row(label, *(f"{values[k]:.4f}" if k in values else "-" for k in keys))
    console = Console()
    console.print(table)
    if summary.export_dir:
        console.print(f"exported model: {summary.export_dir}")
    console.print(f"metrics: {job.output_dir / 'metrics.json'}")
    if scratch and summary.test and scratch.test:
        metric = job.eval_metric
        from engine.safeguards_transfer import gain_of

        gain = gain_of(summary.test.get(metric, 0.0), scratch.test.get(metric, 0.0), job.eval_mode)
        better = "higher" if job.eval_mode == "max" else "lower"
        console.print(f"transfer gain on test {metric}: {gain:+.4f} (how much better pre-trained is than scratch; {better} {metric} is better)")
