"""Audio decoding, resampling and feature extraction with the checkpoint's feature extractor (no Ray)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import soundfile as sf

from engine.preprocessing import audio
from engine.preprocessing.speech import PADDING_MASK, encode_transcripts, featurize_batch
from engine.preprocessing.labels import IGNORE_INDEX
from engine.preprocessing.text import trim_batch


def sine(freq: float, rate: int, seconds: float) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * rate / len(samples))


def test_stereo_8k_file_becomes_mono_16k_with_the_same_pitch(tmp_path):
    left = sine(440, 8000, 1.0)
    sf.write(tmp_path / "a.wav", np.stack([left, 0.5 * left], axis=1), 8000)
    clip = audio.load_clip("a.wav", 16000, base_dir=str(tmp_path))
    assert clip.ndim == 1 and clip.dtype == np.float32
    assert len(clip) == 16000
    assert abs(peak_hz(clip, 16000) - 440) < 3
    assert np.abs(clip).max() == pytest.approx(0.375, abs=0.01)  # mean of the channels (0.5 and 0.25 peaks)


def test_bytes_and_hf_struct_decode_like_files(tmp_path):
    buffer = io.BytesIO()
    sf.write(buffer, sine(300, 16000, 0.5), 16000, format="FLAC")
    raw = buffer.getvalue()
    a, rate_a = audio.decode(raw)
    b, rate_b = audio.decode({"bytes": raw, "path": "ignored.flac"})
    assert rate_a == rate_b == 16000 and np.allclose(a, b) and len(a) == 8000
    assert audio.audio_rate(raw) == 16000


def test_rate_mismatch_refused_naming_both_rates_when_resampling_is_off(tmp_path):
    sf.write(tmp_path / "a.wav", sine(440, 8000, 0.2), 8000)
    with pytest.raises(audio.SamplingRateError, match=r"8000 Hz.*16000 Hz.*data.resample"):
        audio.load_clip(str(tmp_path / "a.wav"), 16000, allow_resample=False)


def test_resampling_is_logged_once_with_both_rates(caplog):
    audio._logged_rates.clear()
    with caplog.at_level(logging.INFO, logger="engine.preprocessing.audio"):
        audio.check_rate(8000, 16000, True, where="data.train")
        audio.check_rate(8000, 16000, True, where="data.train")
    lines = [r.getMessage() for r in caplog.records if "resampling" in r.getMessage()]
    assert lines == ["data.train: resampling 8000 Hz -> 16000 Hz (the checkpoint's rate) with soxr"]


def test_unreadable_value_is_refused():
    with pytest.raises(ValueError, match="neither a file path"):
        audio.decode(12345)


def _clips(tmp_path, seconds: list[float], rate: int = 16000) -> np.ndarray:
    paths = []
    for i, s in enumerate(seconds):
        sf.write(tmp_path / f"{i}.wav", sine(200 + 50 * i, rate, s), rate)
        paths.append(f"{i}.wav")
    return np.array(paths, dtype=object)


def test_featurize_sorts_by_length_pads_and_trims(tmp_path, tiny_wav2vec2):
    from engine.models.speech import load_feature_extractor

    batch = {"path": _clips(tmp_path, [0.5, 0.2, 0.3]), "label": np.array(["a", "b", "c"], dtype=object)}
    fe = load_feature_extractor(str(tiny_wav2vec2))
    out = featurize_batch(batch, feature_extractor=fe, audio_column="path", max_seconds=1.0,
                          base_dir=str(tmp_path), label_column="label", labels=["a", "b", "c"])
    assert out["input_values"].shape == (3, 16000) and out["input_values"].dtype == np.float32
    assert out["attention_mask"].sum(axis=1).tolist() == [3200, 4800, 8000]  # sorted by length
    assert out["labels"].tolist() == [1, 2, 0]  # labels follow their clips
    # do_normalize from the checkpoint: zero mean, unit variance over each clip's real samples
    first = out["input_values"][0, :3200]
    assert abs(first.mean()) < 1e-3 and first.std() == pytest.approx(1.0, abs=1e-2)
    trimmed = trim_batch(out)
    assert trimmed["input_values"].shape == (3, 8000) and trimmed["attention_mask"].shape == (3, 8000)


def test_checkpoint_without_attention_mask_gets_none_after_trimming(tmp_path, tiny_wav2vec2):
    from transformers import Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor.from_pretrained(str(tiny_wav2vec2), return_attention_mask=False)
    batch = {"path": _clips(tmp_path, [0.2, 0.4])}
    out = featurize_batch(batch, feature_extractor=fe, audio_column="path", max_seconds=1.0, base_dir=str(tmp_path))
    assert PADDING_MASK in out and "attention_mask" not in out
    trimmed = trim_batch(out)
    assert set(trimmed) == {"input_values"} and trimmed["input_values"].shape == (2, 6400)


def test_whisper_features_keep_the_checkpoint_window_and_labels_drop_the_start_token(tmp_path, tiny_whisper):
    from engine.models.speech import load_feature_extractor, load_target_tokenizer

    fe = load_feature_extractor(str(tiny_whisper))
    tok = load_target_tokenizer(str(tiny_whisper), None, "en", "transcribe")
    start = tok.convert_tokens_to_ids("<|startoftranscript|>")
    batch = {"path": _clips(tmp_path, [0.4, 0.3], rate=8000), "transcript": np.array(["one two", "stop"], dtype=object)}
    out = featurize_batch(batch, feature_extractor=fe, audio_column="path", max_seconds=2.0, base_dir=str(tmp_path),
                          transcript_column="transcript", tokenizer=tok, max_label_length=16, decoder_start_token_id=start)
    assert out["input_features"].shape == (2, 80, 200)  # 2-second window of the tiny checkpoint
    assert "attention_mask" not in out
    first = out["labels"][0]
    prefix = tok.convert_tokens_to_ids(["<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    assert first[:3].tolist() == prefix and start not in first.tolist()
    assert tok.decode(first[first != IGNORE_INDEX], skip_special_tokens=True) == "stop"  # shorter clip first
    trimmed = trim_batch(out)
    assert trimmed["input_features"].shape == (2, 80, 200)
    assert trimmed["labels"].shape[1] == int((out["labels"] != IGNORE_INDEX).sum(axis=1).max())


def test_ctc_transcripts_pad_with_ignore_index(tiny_wav2vec2):
    from engine.models.speech import load_target_tokenizer

    tok = load_target_tokenizer(str(tiny_wav2vec2))
    labels = encode_transcripts(["go", "turn left"], tok, max_length=12)
    assert labels.shape == (2, 12)
    assert (labels[0, 2:] == IGNORE_INDEX).all() and (labels[1, :9] != IGNORE_INDEX).all()
    assert tok.decode(labels[1, :9].tolist(), group_tokens=False) == "turn left"
