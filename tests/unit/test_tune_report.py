"""The search report cites its numbers: strategies compared at equal budget with their noise (hand-derived),
"the search cannot tell", plots at equal budget without meaningless points, with chance and the chosen trial."""

from __future__ import annotations

import pytest

from cluster.tune import report as tune_report
from cluster.tune import search as tune
from cluster.tune.evidence import best_up_to, compare_strategies, recommendation_lines
from engine.config.schema import build_job
from engine.safeguards.transfer import transfer_verdict

M = "val_accuracy"


def trial(tid, depth, ratio, last_step, best, stopped, peft="none"):
    return {"trial_id": tid, "overrides": {"finetune.freeze_depth": depth, "finetune.backbone_lr_ratio": ratio},
            "command": f"finetune.freeze_depth={depth} finetune.backbone_lr_ratio={ratio}", "final": best, "best": best,
            "best_step": last_step, "best_checkpoint": None, "iterations": last_step // 10, "last_step": last_step,
            "planned_steps": 30, "stopped_early": stopped, "forgetting": None, "train_val_gap": None, "error": None,
            "freeze_depth": depth, "peft_method": peft, "backbone_lr_ratio": ratio}


# light (2 of 6 frozen) ran 30 steps; full and feature extraction were stopped by ASHA at step 10
ROWS = [trial("a1", 2, 0.1, 30, 0.80, False), trial("b2", 0, 0.5, 10, 0.60, True), trial("c3", 6, 0.3, 10, 0.40, True)]
HISTORIES = {"a1": [{"step": 10, M: 0.70}, {"step": 20, M: 0.75}, {"step": 30, M: 0.80}],
             "b2": [{"step": 10, M: 0.60}], "c3": [{"step": 10, M: 0.40}]}


def test_strategies_are_compared_at_the_step_both_reached():
    assert best_up_to(HISTORIES["a1"], M, "max", 20) == 0.75 and best_up_to(HISTORIES["a1"], M, "min", 30) == 0.70
    comparisons = compare_strategies(ROWS, HISTORIES, M, "max", 6, 100)
    assert [c.strategy for c in comparisons] == ["feature extraction", "full fine-tuning"]
    feat, full = comparisons
    # at step 10 (not a1's 0.80 after 30 steps): se = sqrt(0.7*0.3/100 + 0.6*0.4/100) = sqrt(0.0045) = 0.0670820
    assert (full.step, full.chosen, full.other) == (10, 0.70, 0.60)
    assert full.diff == pytest.approx(0.10) and full.se == pytest.approx(0.0670820, abs=1e-6) and full.outcome == "cannot tell"
    # 0.70 vs 0.40: se = sqrt(0.0021 + 0.0024) = 0.0670820; 0.30 > 2 SE
    assert feat.diff == pytest.approx(0.30) and feat.outcome == "better"
    text = "\n".join(recommendation_lines("light fine-tuning", "freeze the bottom 2", comparisons, M, 100))
    assert "The search cannot tell light fine-tuning from full fine-tuning** on 100 validation rows" in text
    assert "cheapest of them to train is **light fine-tuning**" in text
    assert "light fine-tuning vs full fine-tuning (trial b2) at step 10: val_accuracy 0.7000 vs 0.6000, difference +0.1000, standard error 0.0671: cannot tell" in text


def test_recommendation_when_the_choice_is_clear_or_cannot_be_compared():
    rows = [ROWS[0], {**ROWS[1], "best": 0.45}, ROWS[2]]
    histories = {**HISTORIES, "b2": [{"step": 10, M: 0.45}]}
    text = "\n".join(recommendation_lines("light fine-tuning", "x.", compare_strategies(rows, histories, M, "max", 6, 100), M, 100))
    assert "It beat every other strategy tried by more than 2 standard errors on 100 validation rows" in text
    alone = recommendation_lines("light fine-tuning", "x.", compare_strategies(ROWS[:1], HISTORIES, M, "max", 6, 100), M, 100)
    assert "the search cannot compare strategies" in alone[0]
    # loss has no standard error here: never called better on the numbers alone
    loss = compare_strategies([{**r} for r in ROWS], {k: [{"step": h["step"], "val_loss": 1 - h[M]} for h in v] for k, v in HISTORIES.items()},
                              "val_loss", "min", 6, 100)
    assert all(c.se is None and c.outcome == "cannot tell" for c in loss) and loss[1].diff == pytest.approx(0.10)


def test_plots_compare_at_equal_budget_drop_meaningless_points_and_show_chance(tmp_path, monkeypatch):
    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(tune_report, "save_fig", keep)
    tune_report.plot_results(tmp_path, ROWS, HISTORIES, M, 6, chance=0.35)
    ratio = figures["metric_vs_lr_ratio.png"].axes[0]
    assert "1 left out: fully frozen" in ratio.get_title()  # c3 freezes all 6 blocks: its LR ratio means nothing
    xs = {round(float(x), 3) for collection in ratio.collections for x, _ in collection.get_offsets()}
    assert xs == {0.1, 0.5}
    labels = [t.get_text() for t in ratio.get_legend().get_texts()]
    assert "every trial at step 10 (equal budget)" in labels and "chosen trial a1" in labels and "chance / majority class 0.350" in labels
    depth = figures["metric_vs_freeze_depth.png"].axes[0]
    low, high = depth.get_ylim()
    assert low <= 0.35 and high - low >= 0.2
    curves = [t.get_text() for t in figures["learning_curves.png"].axes[0].get_legend().get_texts()]
    assert "chosen a1: lr_ratio=0.1 depth=2" in curves and "c3: lr_ratio=0.3 depth=6" in curves


def test_report_has_the_verdict_and_no_recommendation_without_signal(tmp_path):
    raw = {"name": "t", "model": {"name": "m", "labels": ["a", "b", "c"]}, "data": {"train": "x.parquet"}, "output": {"dir": str(tmp_path)}}
    job = build_job(raw)
    best_job = build_job({**raw, "finetune": {"freeze_depth": 2}})
    outcome = tune.TuneOutcome(out_dir=tmp_path, trials=ROWS, histories=HISTORIES, best_job=best_job, validation_rows=100)
    report = tune_report.write_report(tmp_path, job, outcome, 6, {"accuracy": 0.7}, None, []).read_text()
    assert "The search cannot tell light fine-tuning from full fine-tuning" in report and "difference +0.1000" in report
    from engine.safeguards.transfer import class_baselines

    no_signal = transfer_verdict("accuracy", 0.36, 0.34, "max", 100, baselines=class_baselines({"a": 40, "b": 30, "c": 30}))
    report = tune_report.write_report(tmp_path, job, outcome, 6, {"accuracy": 0.36}, (no_signal, None), []).read_text()
    assert "**transfer verdict: no signal (strength: none)**" in report and "## Recommendation\n\nNone: no signal" in report
    assert "cannot tell light" not in report


def test_ranked_table_in_a_file_is_whole_plain_utf8_and_wraps_on_a_terminal():
    import io

    from cluster.tune.report import print_ranked

    long = "shoulders train JOB " + " ".join(f"finetune.some_long_key_{i}=0.00{i}" for i in range(12))
    rows = [{"trial_id": f"t{i}", "command": long + f" seed={i}", "best": 0.5 + i / 10, "iterations": 3, "stopped_early": i == 1,
             "forgetting": None, "drift": 0.0123} for i in range(3)]
    out = io.StringIO()
    print_ranked(rows, "val_accuracy", out)
    text = out.getvalue()
    text.encode("utf-8").decode("utf-8")
    lines = text.splitlines()
    assert all(line.isascii() for line in lines)  # no box drawing to cut mid-character
    assert [line.split()[1] for line in lines[3:]] == ["t0", "t1", "t2"]
    assert all(line.endswith(f"seed={i}") and long in line for i, line in enumerate(lines[3:]))  # the overrides whole

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    print_ranked(rows, "val_accuracy", tty)
    assert "seed=2" in tty.getvalue() and "…" not in tty.getvalue()  # folded onto more lines, not cut
