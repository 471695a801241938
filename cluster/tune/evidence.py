"""The recommendation of a search, derived from its trials: the chosen trial's strategy against the best
trial of every other strategy at the same budget (ASHA stops trials at different steps, so each pair is
compared at the last step both reached), with the difference and its noise, or "the search cannot tell".

Pure functions on the trial rows and histories of ``cluster.tune.search``; no Ray, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.safeguards.transfer import PROPORTION_METRICS, Z, gain_of, proportion_se

CHEAPEST_FIRST = ("feature extraction", "parameter-efficient fine-tuning", "light fine-tuning", "full fine-tuning")
"""Strategies from the fewest trained weights to the most: with equal evidence, the first is cheaper."""


def recommendation(n_frozen: int, depth: int, peft_method: str) -> tuple[str, str]:
    """(strategy name, advice) for the chosen freeze depth and PEFT method."""
    if peft_method != "none":
        return "parameter-efficient fine-tuning", f"adapters ({peft_method}) on the top {depth - n_frozen} of {depth} blocks; the base weights stay frozen."
    if n_frozen >= depth:
        return "feature extraction", "freeze the whole backbone and train the head."
    if n_frozen == 0:
        return "full fine-tuning", "fine-tune every block with the head."
    return "light fine-tuning", f"freeze the bottom {n_frozen} of {depth} blocks and fine-tune the top {depth - n_frozen} with the head."


def trial_strategy(row: dict[str, Any], depth: int | None) -> tuple[str, int | None]:
    """(strategy name, frozen blocks) of a trial row (its resolved ``freeze_depth`` and ``peft_method``)."""
    from engine.models.blocks import resolve_freeze_depth

    if depth is None or row.get("freeze_depth", "?") == "?":
        return "?", None
    n_frozen = resolve_freeze_depth(row.get("freeze_depth") or 0, depth)
    return recommendation(n_frozen, depth, row.get("peft_method") or "none")[0], n_frozen


def best_up_to(history: list[dict[str, Any]], metric: str, mode: str, step: int) -> float | None:
    """The best ``metric`` a trial reported at or before optimizer step ``step``."""
    values = [h[metric] for h in history if h.get(metric) is not None and int(h.get("step", 0) or 0) <= step]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


@dataclass(frozen=True)
class Comparison:
    """The chosen trial against the best trial of another strategy, both at ``step``."""

    strategy: str
    trial_id: str
    step: int
    chosen: float
    other: float
    diff: float
    """How much better the chosen trial is (positive is better, whatever the mode)."""
    se: float | None
    """Standard error of the difference (binomial, on the validation rows), None for loss-like metrics."""

    @property
    def outcome(self) -> str:
        """``better``, ``worse`` or ``cannot tell`` (within ``Z`` standard errors, or no noise estimate)."""
        if self.se is None or abs(self.diff) <= Z * self.se:
            return "cannot tell"
        return "better" if self.diff > 0 else "worse"

    def line(self, chosen_name: str, metric: str) -> str:
        noise = f", standard error {self.se:.4f}" if self.se is not None else ", noise not estimated for this metric"
        return (f"{chosen_name} vs {self.strategy} (trial {self.trial_id}) at step {self.step}: {metric} {self.chosen:.4f} vs "
                f"{self.other:.4f}, difference {self.diff:+.4f}{noise}: {self.outcome}")


def compare_strategies(
    rows: list[dict[str, Any]], histories: dict[str, list[dict[str, Any]]], metric: str, mode: str, depth: int | None,
    num_val: int | None,
) -> list[Comparison]:
    """The chosen trial (``rows[0]``) against the best trial of each other strategy, at equal budget."""
    if not rows or rows[0]["best"] is None:
        return []
    chosen = rows[0]
    chosen_name, _ = trial_strategy(chosen, depth)
    chosen_history = histories.get(chosen["trial_id"], [])
    proportion = metric.removeprefix("val_") in PROPORTION_METRICS and bool(num_val)
    found: dict[str, Comparison] = {}
    for row in rows[1:]:
        name, _ = trial_strategy(row, depth)
        if name in ("?", chosen_name) or row["best"] is None:
            continue
        step = min(int(chosen.get("last_step") or 0), int(row.get("last_step") or 0))
        mine, theirs = best_up_to(chosen_history, metric, mode, step), best_up_to(histories.get(row["trial_id"], []), metric, mode, step)
        if mine is None or theirs is None:
            continue
        se = math.sqrt(proportion_se(mine, num_val) ** 2 + proportion_se(theirs, num_val) ** 2) if proportion else None
        candidate = Comparison(name, row["trial_id"], step, mine, theirs, gain_of(mine, theirs, mode), se)
        if name not in found or candidate.diff < found[name].diff:  # the strongest rival of that strategy
            found[name] = candidate
    return [found[name] for name in CHEAPEST_FIRST if name in found]


def recommendation_lines(chosen_name: str, advice: str, comparisons: list[Comparison], metric: str, num_val: int | None) -> list[str]:
    """The recommendation paragraph of ``report.md``: the choice, then the comparisons it rests on."""
    evidence = [f"- {c.line(chosen_name, metric)}" for c in comparisons]
    if not comparisons:
        return [f"**{chosen_name}** ({advice}) scored highest, but no trial of another strategy reached a comparable budget: "
                "the search cannot compare strategies. Search `finetune.freeze_depth` (or `finetune.strategy`) more widely.", ""]
    tied = [c.strategy for c in comparisons if c.outcome == "cannot tell"]
    beaten = [c.strategy for c in comparisons if c.outcome == "better"]
    rows = f" on {num_val} validation rows" if num_val else ""
    if not tied and len(beaten) == len(comparisons):
        head = f"**{chosen_name}**: {advice} It beat every other strategy tried by more than {Z:g} standard errors{rows}:"
    elif tied:
        options = [chosen_name, *tied]
        cheapest = min(options, key=CHEAPEST_FIRST.index)
        head = (f"**The search cannot tell {chosen_name} from {', '.join(tied)}**{rows} (differences within {Z:g} standard "
                f"errors, or no noise estimate). {chosen_name} scored highest; the cheapest of them to train is **{cheapest}**.")
    else:
        ahead = [c.strategy for c in comparisons if c.outcome == "worse"]
        head = (f"**{chosen_name}** scored highest over its own budget, but at equal budget {', '.join(ahead)} was ahead by more "
                f"than {Z:g} standard errors{rows}: the search cannot tell which is better; compare them at the full budget.")
    return [head, "", *evidence, ""]
