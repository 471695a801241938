"""Speech jobs end to end through ``shoulders train`` on a local Ray: 2 workers, tiny checkpoints built here.

Audio is synthetic (tones whose pitch contour depends on the word; no espeak-ng needed), written at
8 kHz for 16 kHz checkpoints, so every job also goes through resampling.
"""

from __future__ import annotations

import json

import pytest
import yaml

import tiny_speech
from cluster.cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    return tiny_speech.write_tone_keywords(tmp_path_factory.mktemp("tones"), rate=8000, per_word=16, seconds=0.5)


def run_job(tmp_path, name: str, raw: dict) -> dict:
    raw = {"name": name, "output": {"dir": str(tmp_path / name)}, "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}, **raw}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    return json.loads((tmp_path / name / "metrics.json").read_text())


def splits(tones) -> dict:
    return {"train": str(tones["train"]), "validation": str(tones["validation"]), "test": str(tones["test"]), "audio_column": "path"}


def assert_corpus_error_rates(metrics: dict, manifest, prefix: str = "") -> None:
    """WER and CER are corpus-level rates over ``manifest``'s transcripts: word (character) edits over the
    reference words (characters), so each is a whole number of edits over the split's total, never negative."""
    import pyarrow.csv as pacsv

    transcripts = pacsv.read_csv(manifest).column("transcript").to_pylist()
    totals = {"wer": sum(len(t.split()) for t in transcripts), "cer": sum(len(t) for t in transcripts)}
    for name, total in totals.items():
        edits = metrics[prefix + name] * total
        assert edits >= 0 and edits == pytest.approx(round(edits), abs=1e-3), (name, metrics[prefix + name], total)


def as_parquet_bytes(manifest, out):
    """The manifest's clips as a parquet file of {bytes, path} structs, as Hugging Face datasets write audio."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = pacsv.read_csv(manifest).to_pydict()
    audio = [{"bytes": (manifest.parent / p).read_bytes(), "path": p} for p in rows["path"]]
    pq.write_table(pa.table({"path": audio, "label": rows["label"]}), out)
    return out


def test_keyword_classification_learns_from_resampled_audio(ray_local, tmp_path, tiny_wav2vec2, tones):
    train = as_parquet_bytes(tones["train"], tmp_path / "train.parquet")  # training audio inside parquet, the rest as files
    metrics = run_job(tmp_path, "kw", {
        "model": {"name": str(tiny_wav2vec2), "task": "audio_classification"},
        "data": {**splits(tones), "train": str(train), "max_audio_seconds": 0.5, "rows_per_block": 16},
        "finetune": {"strategy": "full", "freeze_feature_encoder": False, "head_lr": 3e-3, "backbone_lr_ratio": 1.0},
        "optim": {"epochs": 6, "batch_size": 8},
    })
    assert metrics["test"]["accuracy"] > 0.6  # 3 words: chance is 0.33
    assert (tmp_path / "kw" / "model" / "preprocessor_config.json").is_file()


def test_ctc_reports_wer_and_cer_and_its_loss_falls(ray_local, tmp_path, tiny_wav2vec2, tones):
    metrics = run_job(tmp_path, "ctc", {
        "model": {"name": str(tiny_wav2vec2), "task": "ctc"},
        "data": {**splits(tones), "transcript_column": "transcript", "max_audio_seconds": 0.5, "max_length": 8, "rows_per_block": 16},
        "finetune": {"strategy": "full", "freeze_feature_encoder": False, "head_lr": 3e-3, "backbone_lr_ratio": 1.0},
        "optim": {"epochs": 4, "batch_size": 8, "precision": "bf16"},
    })
    history = metrics["history"]
    assert len(history) >= 3 and all({"val_wer", "val_cer"} <= set(h) for h in history)
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert all(h["tflops_per_s_per_device"] > 0 for h in history)
    assert {"wer", "cer", "loss"} <= set(metrics["test"])
    for h in history:
        assert_corpus_error_rates(h, tones["validation"], prefix="val_")
    assert_corpus_error_rates(metrics["test"], tones["test"])


def whisper_forward_flops(model_dir, label_length: int) -> float:
    """Forward FLOPs of one sample (a full feature window, ``label_length`` decoder tokens), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    extractor = WhisperFeatureExtractor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir)
    features = torch.zeros(1, extractor.feature_size, extractor.nb_max_frames)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_features=features, labels=torch.full((1, label_length), 5))
    return counter.get_total_flops()


def test_whisper_lora_generates_and_reports_wer_and_cer(ray_local, tmp_path, tiny_whisper, tones):
    metrics = run_job(tmp_path, "whisper", {
        "model": {"name": str(tiny_whisper), "task": "speech_seq2seq", "language": "en"},
        "data": {**splits(tones), "transcript_column": "transcript", "max_length": 8, "rows_per_block": 16},
        "finetune": {"strategy": "lora", "head_lr": 3e-3},
        "peft": {"target_modules": ["q_proj", "v_proj"]},
        "optim": {"max_steps": 6, "batch_size": 8},
        "eval": {"every_n_steps": 3},
    })
    history = metrics["history"]
    assert [h["step"] for h in history] == [3, 6]
    for h in history:
        assert_corpus_error_rates(h, tones["validation"], prefix="val_")
    # The step's FLOPs are counted (encoder frames, convolutions, decoder), not taken from transcript tokens:
    # a LoRA step over a frozen base is about two forward passes (forward + input gradients) per sample.
    forward = whisper_forward_flops(tiny_whisper, label_length=8)
    for h in history:
        per_sample = h["tflops_per_s_per_device"] * 1e12 * 2 / h["samples_per_s"]  # 2 workers
        assert 1.5 * forward < per_sample < 2.5 * forward
    assert_corpus_error_rates(metrics["test"], tones["test"])
    exported = tmp_path / "whisper" / "model"
    assert (exported / "preprocessor_config.json").is_file() and (exported / "tokenizer_config.json").is_file()
