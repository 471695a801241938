"""Speech job schema and driver-side checks: rates, feature options, columns, vocabulary (no Ray, no workers)."""

from __future__ import annotations

import logging

import pytest

import tiny_speech
from cluster.preflight.data import check_data
from cluster.preflight.job import preflight
from engine.preprocessing.audio import _logged_rates
from engine.config.schema import build_job
from engine.errors import JobError


@pytest.fixture(scope="module")
def tones_8k(tmp_path_factory):
    return tiny_speech.write_tone_keywords(tmp_path_factory.mktemp("tones8k"), rate=8000, per_word=3, stereo=True)


def speech_job(model_dir, data: dict, task: str = "audio_classification", **extra):
    raw = {"model": {"name": str(model_dir), "task": task}, "data": {"audio_column": "path", **data}, **extra}
    return build_job(raw)


def test_8k_data_for_a_16k_checkpoint_is_resampled_and_logged(tiny_wav2vec2, tones_8k, caplog):
    _logged_rates.clear()
    job = speech_job(tiny_wav2vec2, {"train": str(tones_8k["train"]), "validation": str(tones_8k["validation"])})
    with caplog.at_level(logging.INFO):
        info = check_data(job)
    assert info.labels == ["no", "up", "yes"]
    messages = [r.getMessage() for r in caplog.records]
    assert "data.train: resampling 8000 Hz -> 16000 Hz (the checkpoint's rate) with soxr" in messages


def test_8k_data_refused_naming_both_rates_when_resample_is_false(tiny_wav2vec2, tones_8k):
    job = speech_job(tiny_wav2vec2, {"train": str(tones_8k["train"]), "resample": False})
    with pytest.raises(JobError, match=r"data.train is sampled at 8000 Hz but the checkpoint expects 16000 Hz and data.resample is false"):
        check_data(job)


def test_feature_options_contradicting_the_checkpoint_are_refused(tiny_wav2vec2, tones_8k):
    train = {"train": str(tones_8k["train"])}
    with pytest.raises(JobError, match=r"data.sampling_rate is 8000 Hz but the checkpoint .* 16000 Hz"):
        check_data(speech_job(tiny_wav2vec2, {**train, "sampling_rate": 8000}))
    with pytest.raises(JobError, match=r"data.normalize is false but the checkpoint's feature extractor has do_normalize: true"):
        check_data(speech_job(tiny_wav2vec2, {**train, "normalize": False}))
    check_data(speech_job(tiny_wav2vec2, {**train, "sampling_rate": 16000, "normalize": True}))  # agreeing options pass


def test_missing_audio_column_and_unreadable_audio_are_named(tiny_wav2vec2, tones_8k, tmp_path):
    with pytest.raises(JobError, match=r"column 'audio' \(data.audio_column\)"):
        check_data(build_job({"model": {"name": str(tiny_wav2vec2), "task": "audio_classification"}, "data": {"train": str(tones_8k["train"])}}))
    manifest = tmp_path / "bad.csv"
    manifest.write_text("path,label\nmissing.wav,yes\nmissing2.wav,no\n")
    with pytest.raises(JobError, match=r"could not read the audio 'missing.wav'"):
        check_data(speech_job(tiny_wav2vec2, {"train": str(manifest)}))


def test_asr_jobs_need_a_transcript_column_and_refuse_labels(tiny_wav2vec2, tones_8k):
    with pytest.raises(JobError, match=r"column 'text' \(data.transcript_column\)"):
        check_data(speech_job(tiny_wav2vec2, {"train": str(tones_8k["train"]), "transcript_column": "text"}, task="ctc"))
    with pytest.raises(JobError, match="model.labels is set but model.task is 'ctc'"):
        build_job({"model": {"name": "x", "task": "ctc", "labels": ["a", "b"]}, "data": {"train": "t.csv"}})
    assert build_job({"model": {"name": "x", "task": "speech_seq2seq"}, "data": {"train": "t.csv"}}).eval_metric == "wer"


def test_ctc_checkpoint_without_vocabulary_gets_one_from_the_transcripts(tmp_path, tones_8k):
    bare = tiny_speech.save_tiny_wav2vec2(tmp_path / "bare", with_vocab=False)
    job = speech_job(bare, {"train": str(tones_8k["train"]), "validation": str(tones_8k["validation"])}, task="ctc",
                     output={"dir": str(tmp_path / "run")})
    job, _ = preflight(job)
    assert job.model.tokenizer == str(tmp_path / "run" / "vocab")
    from engine.models.speech import load_target_tokenizer

    vocab = load_target_tokenizer(job.model.tokenizer).get_vocab()
    assert {"Y", "E", "S", "N", "O", "U", "P", "|"} <= set(vocab) and "Z" not in vocab
    assert job.safeguards.track_forgetting is False  # text retention sets do not apply to speech


def test_parquet_with_audio_bytes_is_checked_like_files(tiny_wav2vec2, tones_8k, tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = pacsv.read_csv(tones_8k["train"]).to_pydict()
    folder = tones_8k["train"].parent
    audio = [{"bytes": (folder / p).read_bytes(), "path": p} for p in rows["path"]]
    pq.write_table(pa.table({"audio": audio, "label": rows["label"]}), tmp_path / "train.parquet")
    job = build_job({"model": {"name": str(tiny_wav2vec2), "task": "audio_classification"},
                     "data": {"train": str(tmp_path / "train.parquet"), "resample": False}})
    with pytest.raises(JobError, match="8000 Hz"):
        check_data(job)
    job.data.resample = True
    assert check_data(job).labels == ["no", "up", "yes"]


def test_whisper_with_every_encoder_block_frozen_is_refused(tiny_whisper, tones_8k):
    job = speech_job(tiny_whisper, {"train": str(tones_8k["train"])}, task="speech_seq2seq", finetune={"strategy": "feature_extraction"})
    with pytest.raises(JobError, match="freeze_depth is 'all' for speech_seq2seq"):
        check_data(job)
