"""What the forgetting and drift probes found, as report lines with their units (run and search reports, the summary)."""

from __future__ import annotations

from typing import Any

from engine.config.schema import JobSpec

MEASURE_UNITS = {
    "cka": "1 - linear CKA of pooled backbone features vs the pre-trained model; 0 = unchanged, 1 = unrelated",
    "lm_loss": "increase of the causal-LM loss in nats",
    "mlm_loss": "increase of the masked-LM loss in nats, through the checkpoint's own masked-LM head",
}
"""What a number of each ``safeguards.forgetting_measure`` means (drift on target rows is always ``cka``)."""


def forgetting_lines(best: dict[str, Any], best_job: JobSpec) -> list[str]:
    """What the probes found (last evaluation vs step 0): forgetting of the source on the retention set,
    with drift on a few target rows beside it, or only drift on the target's rows (which is not forgetting),
    each with its unit."""
    from engine.safeguards.guards import DRIFT_ROWS, forgetting_measure

    lines = []
    if best.get("forgetting") is not None:  # a probe that fell back to CKA reports retention_cka
        unit = MEASURE_UNITS["cka" if "retention_cka" in best else forgetting_measure(best_job)]
        lines.append(f"- forgetting of the source (retention set {best_job.safeguards.retention_data}, last evaluation vs step 0; "
                     f"{unit}): {best['forgetting']:.4f}")
        if best.get("drift") is not None:
            lines.append(f"- drift on target data (first {DRIFT_ROWS} validation rows, last evaluation vs step 0; "
                         f"{MEASURE_UNITS['cka']}): {best['drift']:.4f}, how far the model moved on the task's own inputs")
    elif best.get("drift") is not None:
        lines.append(f"- drift on target data (validation rows, last evaluation vs step 0; {MEASURE_UNITS['cka']}): "
                     f"{best['drift']:.4f}. This is how far the model moved, not forgetting of the source: set "
                     "safeguards.retention_data to measure that")
    return lines
