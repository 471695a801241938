"""The quickstart's safeguards: a retention file of general English apart from the task (forgetting of the
source is measured there), and the feature-extraction preset's linear-probe learning rate."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.datagen.fortunes import FORTUNES_DIR, RETENTION_TOPICS, build_fortunes, read_fortunes
from engine.config.schema import build_job, load_job

JOBS = Path(__file__).parents[2] / "jobs"


def test_feature_extraction_preset_trains_a_linear_probe_unless_head_lr_is_set():
    raw = {"model": {"name": "m", "labels": ["a", "b"]}, "data": {"train": "t.parquet"}}
    assert build_job({**raw, "finetune": {"strategy": "feature_extraction"}}).finetune.head_lr == 1e-2
    assert build_job({**raw, "finetune": {"strategy": "feature_extraction", "head_lr": 2e-3}}).finetune.head_lr == 2e-3
    assert build_job({**raw, "finetune": {"strategy": "full"}}).finetune.head_lr == 5e-4  # the schema default


@pytest.mark.skipif(not (FORTUNES_DIR / "love").is_file(), reason="Debian fortunes are not installed")
def test_quickstart_retention_file_is_general_english_apart_from_the_task(tmp_path):
    counts = build_fortunes(tmp_path)
    assert counts["retention"] == 64
    retention = pq.read_table(tmp_path / "retention.parquet").column("text").to_pylist()
    task = {t for split in ("train", "validation", "test") for t in pq.read_table(tmp_path / f"{split}.parquet").column("text").to_pylist()}
    assert len(set(retention)) == 64 and not set(retention) & task
    other_topics = {q for topic in RETENTION_TOPICS for q in read_fortunes(topic)}
    assert set(retention) <= other_topics
    job = load_job(JOBS / "quickstart.yaml")
    assert job.safeguards.track_forgetting and job.safeguards.retention_data == "data/fortunes/retention.parquet"
