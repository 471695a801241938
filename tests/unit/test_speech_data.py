"""espeak-ng speech data: held-out voices, manifests and parquet bytes that the engine reads back."""

from __future__ import annotations

import pytest

from cluster.datagen import speech as datagen_speech
from engine.preprocessing.audio import decode

needs_espeak = pytest.mark.skipif(not datagen_speech.espeak_available(), reason="espeak-ng is not installed")


def test_test_voices_are_never_heard_in_training():
    plan = datagen_speech.plan_utterances("keywords")
    voices = {split: {r["voice"] for r in rows} for split, rows in plan.items()}
    assert not voices["train"] & voices["test"] and not voices["train"] & voices["validation"]
    assert {r["label"] for r in plan["test"]} == set(datagen_speech.KEYWORDS)
    assert len(plan["train"]) == len(datagen_speech.KEYWORDS) * len(datagen_speech.ACCENTS) * len(datagen_speech.VOICES["train"])
    sentences = datagen_speech.plan_utterances("asr")["train"]
    assert all(2 <= len(str(r["text"]).split()) <= 4 and r["label"] is None for r in sentences)


@needs_espeak
def test_small_set_round_trips_through_manifest_and_parquet(tmp_path, monkeypatch):
    monkeypatch.setattr(datagen_speech, "ACCENTS", ("en-us",))
    monkeypatch.setattr(datagen_speech, "KEYWORDS", ("yes", "stop"))
    counts = datagen_speech.build_speech_data("keywords", tmp_path / "csv", rate=8000)
    assert counts == {"train": 14, "validation": 4, "test": 6}
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = pacsv.read_csv(tmp_path / "csv" / "test.csv").to_pylist()
    samples, rate = decode(rows[0]["path"], str(tmp_path / "csv"))
    assert rate == 8000 and 0.1 < len(samples) / rate < 2.0
    assert rows[0]["label"] == rows[0]["transcript"] in ("yes", "stop")
    datagen_speech.build_speech_data("keywords", tmp_path / "pq", fmt="parquet")
    table = pq.read_table(tmp_path / "pq" / "train.parquet")
    samples, rate = decode(table.column("audio")[0].as_py())
    assert rate == 22050 and len(samples) > 1000


def test_parquet_audio_with_small_row_groups_is_decoded_as_read_and_other_splits_are_recut(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.ingest.speech import inline_audio
    from cluster.ingest.splits import SplitInfo

    table = pa.table({"audio": [b"x" * 10] * 64, "transcript": ["a"] * 64})
    pq.write_table(table, tmp_path / "small.parquet", row_group_size=16)
    pq.write_table(table, tmp_path / "one_group.parquet")
    (tmp_path / "m.csv").write_text("path,transcript\n")
    assert inline_audio(SplitInfo("train", [str(tmp_path / "small.parquet")], "parquet", 64), rows_per_block=8)  # 16 rows a group
    assert not inline_audio(SplitInfo("train", [str(tmp_path / "one_group.parquet")], "parquet", 64), rows_per_block=8)  # 64 > 4 x 8
    assert not inline_audio(SplitInfo("train", [str(tmp_path / "m.csv")], "csv", 0), rows_per_block=8)  # paths: re-cut
