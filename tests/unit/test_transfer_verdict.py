"""Transfer verdicts with hand-derived numbers, the fair scratch twin's exact settings, the baselines from
labels, and the sign of the gain for lower-is-better metrics (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import tiny
from cluster.ingest.splits import DataInfo, SplitInfo
from cluster.run.scratch_twin import ScratchSearch, candidate_lrs, judge_run, label_counts, run_baselines
from engine.config.schema import build_job
from engine.safeguards.guards import class_baselines, judge_transfer, scratch_job, transfer_verdict

LABELS = ["a", "b", "c"]
# Training labels 40/30/30: chance 1/3, majority 'a' at 0.40. On n = 100 rows, beating the better baseline
# takes 0.40 + 2 sqrt(0.40 * 0.60 / 100) = 0.40 + 2 * 0.0489898 = 0.4979796.
BASE = class_baselines({"a": 40, "b": 30, "c": 30})


def verdict(p: float, s: float | None, n: int = 100, metric: str = "accuracy", mode: str = "max", **kw):
    return judge_transfer(metric, mode, {metric: p}, None if s is None else {metric: s}, n, **kw)


def test_baselines_chance_majority_and_threshold():
    assert BASE.chance == pytest.approx(1 / 3) and BASE.majority == pytest.approx(0.40) and BASE.majority_label == "a"
    assert BASE.threshold(100) == pytest.approx(0.4979796, abs=1e-6)
    # majority class from training ('a'), its accuracy measured on the evaluated labels (10 of 100)
    skewed = class_baselines({"a": 50, "b": 30, "c": 20}, {"a": 10, "b": 60, "c": 30})
    assert skewed.majority_label == "a" and skewed.majority == pytest.approx(0.10) and skewed.best == pytest.approx(1 / 3)
    assert skewed.threshold(100) == pytest.approx(1 / 3 + 2 * 0.0471405, abs=1e-6)


def test_positive_transfer():
    # se = sqrt(0.8*0.2/100 + 0.5*0.5/100) = sqrt(0.0041) = 0.0640312; margin 0.1280625 < gain 0.30
    v = verdict(0.80, 0.50, baselines=BASE)
    assert v.verdict == "positive" and not v.flagged
    assert v.gain == pytest.approx(0.30) and v.se == pytest.approx(0.0640312, abs=1e-6) and v.margin == pytest.approx(0.1280625, abs=1e-6)


def test_no_measurable_gain():
    # se = sqrt(0.62*0.38/100 + 0.6*0.4/100) = 0.0689638; gain 0.02 within the margin 0.1379276
    v = verdict(0.62, 0.60, baselines=BASE)
    assert v.verdict == "no_gain" and v.flagged and v.name == "no measurable gain"
    assert v.margin == pytest.approx(0.1379276, abs=1e-6)
    assert verdict(0.62, 0.60, min_gain=0.05).margin == pytest.approx(0.1879276, abs=1e-6)


def test_negative_transfer_only_when_scratch_is_significantly_better():
    # se = sqrt(0.45*0.55/100 + 0.7*0.3/100) = 0.0676387; gain -0.25 < -margin -0.1352775; scratch 0.70 beats 0.498
    v = verdict(0.45, 0.70, baselines=BASE)
    assert v.verdict == "negative" and v.gain == pytest.approx(-0.25) and v.margin == pytest.approx(0.1352775, abs=1e-6)
    assert "train from scratch" in v.advice
    assert verdict(0.55, 0.65).verdict == "no_gain"  # worse, but within 2 SE (0.1354): not called negative


def test_no_signal_when_neither_beats_chance_or_majority():
    v = verdict(0.36, 0.34, baselines=BASE)
    assert v.verdict == "no_signal" and "check the data and labels" in v.advice.lower()
    # scratch better by more than the margin (0.17 > 0.1333), but 0.47 < 0.498: nothing was learned, not negative transfer
    assert verdict(0.30, 0.47, baselines=BASE).verdict == "no_signal"
    assert verdict(0.30, 0.47).verdict == "negative"  # the same numbers without baselines
    # one model above the threshold is signal
    assert verdict(0.50, 0.34, baselines=BASE).verdict == "positive"
    # no twin: only the check against chance
    assert verdict(0.36, None, baselines=BASE).verdict == "no_signal"
    alone = verdict(0.60, None, baselines=BASE)
    assert alone.verdict == "above_baseline" and not alone.flagged and alone.gain is None


def test_lower_is_better_metrics_have_the_right_sign():
    # loss: no standard error, margin = min_gain
    v = verdict(0.50, 0.80, metric="loss", mode="min", min_gain=0.1)
    assert v.verdict == "positive" and v.gain == pytest.approx(0.30) and v.se is None and v.margin == pytest.approx(0.1)
    assert verdict(0.80, 0.50, metric="loss", mode="min", min_gain=0.1).verdict == "negative"
    assert verdict(0.50, 0.55, metric="loss", mode="min", min_gain=0.1).verdict == "no_gain"
    assert transfer_verdict("perplexity", 12.0, 20.0, "min").gain == pytest.approx(8.0)
    # WER is a share of the rows: se = sqrt(0.2*0.8/100 + 0.35*0.65/100) = 0.0622495, margin 0.1244990
    wer = verdict(0.20, 0.35, metric="wer", mode="min")
    assert wer.verdict == "positive" and wer.gain == pytest.approx(0.15) and wer.margin == pytest.approx(0.1244990, abs=1e-6)
    assert verdict(0.35, 0.20, metric="wer", mode="min").verdict == "negative"


def test_verdict_prints_the_numbers_it_rests_on():
    text = "\n".join(verdict(0.45, 0.70, baselines=BASE).lines())
    for piece in ("transfer verdict: negative transfer", "n = 100", "pre-trained 0.4500, from scratch 0.7000",
                  "gain of pre-trained over scratch -0.2500", "standard error 0.0676", "margin 0.1353",
                  "chance 0.3333 (3 classes)", "majority class 'a' 0.4000", "> 0.4980"):
        assert piece in text, piece
    loss = "\n".join(verdict(0.5, 0.8, metric="loss", mode="min").lines())
    assert "(lower is better)" in loss and "+0.3000" in loss and "no standard error for loss" in loss


def test_print_summary_gain_sign_for_a_lower_is_better_metric(tmp_path, capsys):
    from cluster.run.summary import print_summary

    job = build_job({"model": {"name": "m", "labels": LABELS}, "data": {"train": "t.parquet"}, "eval": {"metric": "loss"},
                     "output": {"dir": str(tmp_path)}})
    run = lambda loss: SimpleNamespace(best={"val_loss": loss}, test={"loss": loss}, export_dir=None)  # noqa: E731
    print_summary(job, run(0.5), run(0.8))
    assert "transfer gain on test loss: +0.3000" in capsys.readouterr().out


# --- the fair scratch twin -----------------------------------------------------------------------------

def test_scratch_twin_settings(tmp_path):
    job = build_job({
        "name": "topic", "model": {"name": "m", "labels": LABELS}, "data": {"train": "t.parquet", "max_length": 16},
        "finetune": {"freeze_depth": 2, "backbone_lr_ratio": 0.1, "head_lr": 1e-3, "adapter_lr_ratio": 2.0},
        "peft": {"method": "lora", "r": 4}, "optim": {"epochs": 3, "batch_size": 8, "warmup_ratio": 0.1},
        "safeguards": {"compare_scratch": True, "max_forgetting": 0.5, "dropout": 0.2},
        "output": {"dir": str(tmp_path / "run"), "export": "adapter"},
    })
    twin = scratch_job(job, str(tmp_path / "scratch"), lr=3e-3)
    assert twin.name == "topic-scratch" and twin.output_dir == tmp_path / "scratch" and twin.output.export == "merged"
    assert twin.model.from_scratch and twin.model.head == "new" and twin.model.name == "m"
    f = twin.finetune
    assert (f.freeze_depth, f.freeze_embeddings, f.backbone_lr_ratio, f.adapter_lr_ratio, f.head_lr) == (0, False, 1.0, 1.0, 3e-3)
    assert not f.freeze_feature_encoder and twin.peft.method == "none"
    assert twin.optim == job.optim and twin.data == job.data and twin.scaling == job.scaling and twin.seed == job.seed
    s = twin.safeguards
    assert not s.compare_scratch and not s.track_forgetting and s.max_forgetting is None and s.dropout == 0.2
    assert scratch_job(job, str(tmp_path)).finetune.head_lr == 1e-3  # no lr given: the job's head LR
    assert candidate_lrs(job) == pytest.approx([1e-3 / 3, 1e-3, 3e-3])
    assert candidate_lrs(job.model_copy(update={"safeguards": job.safeguards.model_copy(update={"scratch_lrs": [0.1]})})) == [0.1]


def test_scratch_twin_model_is_random_and_fully_trainable(tmp_path):
    from engine.models.prepare import prepare_model

    path = tiny.save_tiny_model("bert", tmp_path / "bert")
    job = build_job({"model": {"name": str(path), "labels": LABELS}, "data": {"train": "t.parquet", "max_length": 16},
                     "finetune": {"strategy": "lora"}, "output": {"dir": str(tmp_path / "run")}})
    pretrained = prepare_model(job, LABELS).model
    twin = prepare_model(scratch_job(job, str(tmp_path / "scratch")), LABELS).model
    params = dict(twin.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    assert not any("lora" in name for name in params)
    reference = dict(pretrained.named_parameters())
    word = next(k for k in params if k.endswith("word_embeddings.weight"))
    ref_word = next(k for k in reference if k.endswith("word_embeddings.weight"))
    assert not torch.equal(params[word], reference[ref_word])


def test_scratch_search_lines_show_how_the_lr_was_chosen():
    search = ScratchSearch("val_accuracy", [1e-4, 3e-4, 1e-3], [0.41, 0.55, None], steps=12, total_steps=48, chosen=3e-4)
    line = search.lines()[0]
    assert "3e-04" not in line and "0.0003" in line and "after 12 of 48 steps" in line
    assert "0.0001 -> 0.4100" in line and "0.001 -> failed" in line


# --- baselines from the data files -------------------------------------------------------------------

def test_label_counts_and_judging_a_run_from_files(tmp_path):
    pq.write_table(pa.table({"text": ["x"] * 10, "label": ["a"] * 6 + ["b"] * 3 + ["c"]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": ["x"] * 8, "label": [0, 1, 1, 1, 1, 2, 2, 2]}), tmp_path / "test.parquet")  # indices
    splits = {name: SplitInfo(name, [str(tmp_path / f"{name}.parquet")], "parquet", rows) for name, rows in (("train", 10), ("test", 8))}
    info = DataInfo(splits=splits, labels=LABELS)
    job = build_job({"model": {"name": "m", "labels": LABELS}, "data": {"train": "t.parquet"}, "output": {"dir": str(tmp_path)}})
    assert label_counts(job, splits["test"], LABELS) == {"a": 1, "b": 4, "c": 3}
    base = run_baselines(job, info, "test")
    assert base.majority_label == "a" and base.majority == pytest.approx(1 / 8) and base.source == "evaluated labels"
    # n = 8: threshold 1/3 + 2 sqrt(2/9 / 8) = 0.6666667; 0.625 is not above it
    assert judge_run(job, info, {"accuracy": 0.625}).verdict == "no_signal"
    assert judge_run(job, info, {"accuracy": 0.75}).verdict == "above_baseline"
    scratch = SimpleNamespace(test={"accuracy": 0.75}, best={})
    assert judge_run(job, info, {"accuracy": 0.75}, None, scratch).verdict == "no_gain"
    no_test = DataInfo(splits={"train": splits["train"], "validation": SplitInfo("validation", splits["test"].files, "parquet", 8)}, labels=LABELS)
    on_val = judge_run(job, no_test, None, {"val_accuracy": 0.75, "step": 3})
    assert on_val.evaluated_on == "validation" and on_val.n == 8
    assert run_baselines(job, DataInfo(splits=splits, labels=None), "test") is None  # not classification


def test_scratch_lr_search_picks_the_best_candidate_on_validation(tmp_path, monkeypatch):
    import cluster.run.trainer

    ran = []

    def fake_run(job, info):  # validation accuracy peaks at lr 3e-3; the lr 1e-1 candidate diverges
        ran.append(job)
        if job.finetune.head_lr == 1e-1:
            raise RuntimeError("loss is nan")
        return SimpleNamespace(best={"val_accuracy": {1e-3: 0.5, 3e-3: 0.7}[job.finetune.head_lr]}, test={"accuracy": 0.6})

    monkeypatch.setattr(cluster.run.trainer, "run_training", fake_run)
    job = build_job({"name": "j", "model": {"name": "m", "labels": LABELS}, "data": {"train": "t.parquet"},
                     "optim": {"epochs": 2, "batch_size": 10}, "scaling": {"num_workers": 1},
                     "safeguards": {"scratch_lrs": [1e-3, 3e-3, 1e-1]}, "output": {"dir": str(tmp_path)}})
    info = DataInfo(splits={"train": SplitInfo("train", ["t.parquet"], "parquet", 200)}, labels=LABELS)
    from cluster.run.scratch_twin import train_scratch_twin

    summary, search = train_scratch_twin(job, info, tmp_path / "scratch")
    # 200 rows / 10 per step x 2 epochs = 40 steps; each candidate trains 25% of them, without export
    assert [j.finetune.head_lr for j in ran] == [1e-3, 3e-3, 1e-1, 3e-3]
    assert all(j.optim.max_steps == 10 and j.output.export == "none" for j in ran[:3])
    assert [j.output_dir for j in ran[:3]] == [tmp_path / "scratch" / f"lr-{i}" for i in range(3)]
    twin = ran[3]
    assert twin.optim == job.optim and twin.output_dir == tmp_path / "scratch" and twin.output.export == "merged"
    assert search.chosen == 3e-3 and search.scores == [0.5, 0.7, None] and (search.steps, search.total_steps) == (10, 40)
    assert summary.test == {"accuracy": 0.6}
    # a fraction of 1: each candidate trains the whole budget and the best run is the twin (no fifth run)
    ran.clear()
    full = job.model_copy(update={"safeguards": job.safeguards.model_copy(update={"scratch_search_fraction": 1.0})})
    _, search = train_scratch_twin(full, info, tmp_path / "scratch-full")
    assert len(ran) == 3 and all(j.optim == job.optim and j.output.export == "merged" for j in ran) and search.chosen == 3e-3


def test_verdict_section_goes_into_the_run_report_once(tmp_path):
    from cluster.run.scratch_twin import add_to_run_report

    assert add_to_run_report(tmp_path / "report.md", verdict(0.45, 0.70, baselines=BASE)) is None  # no report: nothing
    report = tmp_path / "report.md"
    report.write_text("# Run report\n\n## Metrics\n\nval 0.5\n")
    add_to_run_report(report, verdict(0.45, 0.70, baselines=BASE))
    add_to_run_report(report, verdict(0.80, 0.50, baselines=BASE))  # a rerun replaces the section
    text = report.read_text()
    assert text.startswith("# Run report\n\n## Metrics\n\nval 0.5\n\n## Transfer verdict")
    assert text.count("## Transfer verdict") == 1 and "**transfer verdict: positive transfer**" in text and "negative" not in text
