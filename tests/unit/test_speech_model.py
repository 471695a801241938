"""Speech models through the engine's own loading, surgery, PEFT and metrics (tiny checkpoints, no Ray)."""

from __future__ import annotations

import pytest
import torch

from engine.config.schema import build_job
from engine.evaluation.asr import decode_ctc, decode_references, generate_transcripts
from engine.evaluation.metrics import normalize_text
from engine.models.prepare import prepare_model
from engine.models.speech import build_ctc_vocab, load_target_tokenizer
from engine.tasks import get_task


def job(model_dir, task: str, **sections):
    raw = {"model": {"name": str(model_dir), "task": task}, "data": {"train": "unused.csv"}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return build_job(raw)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_keyword_classifier_head_is_projector_and_classifier(tiny_wav2vec2):
    prepared = prepare_model(job(tiny_wav2vec2, "audio_classification", finetune={"freeze_depth": "all"}), ["yes", "no", "up"])
    assert prepared.head_names == ["projector", "classifier"]
    assert prepared.stack.path == "wav2vec2.encoder.layers" and prepared.stack.depth == 2
    # feature extraction: only the two head modules learn
    assert trainable(prepared.model) == {"projector.weight", "projector.bias", "classifier.weight", "classifier.bias"}
    assert prepared.model.classifier.out_features == 3


def test_feature_encoder_freezes_separately_from_the_blocks(tiny_wav2vec2):
    frozen = prepare_model(job(tiny_wav2vec2, "audio_classification", finetune={"freeze_depth": 0}), ["a", "b"]).model
    names = trainable(frozen)
    assert not any(n.startswith("wav2vec2.feature_extractor.") for n in names)
    assert any(n.startswith("wav2vec2.feature_projection.") for n in names)
    assert any(n.startswith("wav2vec2.encoder.layers.0.") for n in names)
    free = prepare_model(job(tiny_wav2vec2, "audio_classification", finetune={"freeze_depth": 0, "freeze_feature_encoder": False}), ["a", "b"]).model
    assert {n for n in trainable(free) if n.startswith("wav2vec2.feature_extractor.")} == {
        n for n, _ in free.named_parameters() if n.startswith("wav2vec2.feature_extractor.")
    }


def test_freeze_depth_counts_transformer_blocks(tiny_wav2vec2):
    model = prepare_model(job(tiny_wav2vec2, "ctc", finetune={"freeze_depth": 1}), None).model
    names = trainable(model)
    assert not any(n.startswith("wav2vec2.encoder.layers.0.") for n in names)
    assert any(n.startswith("wav2vec2.encoder.layers.1.") for n in names)
    assert not any(n.startswith("wav2vec2.feature_projection.") for n in names)  # below the blocks
    assert {"lm_head.weight", "lm_head.bias"} <= names


def test_ctc_head_matches_the_target_vocabulary_and_blank(tiny_wav2vec2):
    tokenizer = load_target_tokenizer(str(tiny_wav2vec2))
    model = prepare_model(job(tiny_wav2vec2, "ctc", finetune={"mask_time_prob": 0.2}), None).model
    assert model.lm_head.out_features == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.ctc_loss_reduction == "mean" and model.config.mask_time_prob == 0.2


def test_ctc_vocabulary_built_from_transcripts(tmp_path, tiny_wav2vec2):
    folder = build_ctc_vocab(["Turn LEFT", "go, three!"], tmp_path / "vocab")
    tokenizer = load_target_tokenizer(str(folder))
    assert set(tokenizer.get_vocab()) >= set("TURNLEFGOHE") | {"|", "<pad>", "<unk>"}
    assert "," not in tokenizer.get_vocab()
    ids = tokenizer("Turn left").input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, group_tokens=False) == "turn left"
    model = prepare_model(job(tiny_wav2vec2, "ctc", model={"tokenizer": str(folder)}), None).model
    assert model.lm_head.out_features == len(tokenizer)


def test_whisper_lora_trains_adapters_only_and_generates(tiny_whisper):
    spec = job(tiny_whisper, "speech_seq2seq", model={"language": "en"}, finetune={"strategy": "lora"},
               peft={"target_modules": ["q_proj", "v_proj"]})
    prepared = prepare_model(spec, None)
    assert prepared.stack.path.endswith("encoder.layers")
    names = trainable(prepared.model)
    assert names and all("lora_" in n for n in names)
    assert any(".decoder." in n for n in names) and any(".encoder." in n for n in names)
    features = torch.randn(2, 80, 200)
    tokenizer = load_target_tokenizer(str(tiny_whisper), None, "en", "transcribe")
    texts = generate_transcripts(prepared.model, {"input_features": features}, tokenizer, spec, torch.bfloat16)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_whisper_freeze_depth_counts_encoder_blocks(tiny_whisper):
    model = prepare_model(job(tiny_whisper, "speech_seq2seq", finetune={"freeze_depth": 1}), None).model
    names = trainable(model)
    assert not any(n.startswith(("model.encoder.layers.0.", "model.encoder.conv")) for n in names)
    assert any(n.startswith("model.encoder.layers.1.") for n in names)
    assert any(n.startswith("model.decoder.layers.0.") for n in names)  # the decoder is above the counted stack


def test_ctc_greedy_decoding_merges_repeats_and_drops_blanks(tiny_wav2vec2):
    tokenizer = load_target_tokenizer(str(tiny_wav2vec2))
    vocab = tokenizer.get_vocab()
    frames = ["g", "g", "<pad>", "o", "|", "<pad>", "o", "<pad>", "o", "n"]
    logits = torch.full((1, len(frames), len(tokenizer)), -10.0)
    for i, token in enumerate(frames):
        logits[0, i, vocab[token]] = 10.0
    assert decode_ctc(logits, tokenizer) == ["go oon"]
    labels = torch.tensor([[vocab["o"], vocab["o"], vocab["n"], -100]])
    assert decode_references(labels, tokenizer, keep_repeats=True) == ["oon"]


def test_asr_metrics_score_decoded_text(tiny_wav2vec2):
    spec = job(tiny_wav2vec2, "ctc")
    tokenizer = load_target_tokenizer(str(tiny_wav2vec2))
    metrics = get_task(spec.model.task).build_metrics(spec, None, torch.device("cpu"), tokenizer=tokenizer)
    vocab = tokenizer.get_vocab()
    target = "go up"
    ids = [vocab["|" if c == " " else c] for c in target]
    labels = torch.tensor([ids + [-100]])
    # frames spell "go un": one word of two wrong, one character of five wrong
    spelled = [vocab[c] for c in "go|un"]
    logits = torch.full((1, len(spelled), len(tokenizer)), -10.0)
    for i, token in enumerate(spelled):
        logits[0, i, token] = 10.0

    class Out:
        loss = torch.tensor(1.5)

    Out.logits = logits
    metrics.update(Out, {"labels": labels})
    result = metrics.compute()
    assert result["wer"] == pytest.approx(0.5) and result["cer"] == pytest.approx(1 / 5) and result["loss"] == pytest.approx(1.5)
    assert normalize_text("  Go   UP ") == "go up"


def test_audio_classification_scores_like_text_classification(tiny_wav2vec2):
    spec = job(tiny_wav2vec2, "audio_classification")
    metrics = get_task(spec.model.task).build_metrics(spec, 3, torch.device("cpu"))

    class Out:
        loss = torch.tensor(0.75)
        logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0]])  # predicts 0, 1, 2, 0

    metrics.update(Out, {"labels": torch.tensor([0, 1, 1, 2])})
    result = metrics.compute()
    # 2 of 4 right; F1 per class: 0 -> 2/3, 1 -> 2/3, 2 -> 0; no WER or perplexity for a classifier
    assert result == pytest.approx({"loss": 0.75, "accuracy": 0.5, "macro_f1": 4 / 9})


@pytest.mark.parametrize("kind", ["hubert", "wavlm"])
def test_hubert_and_wavlm_take_the_same_path(tmp_path, kind):
    from cluster.datagen.speech_models import save_tiny_wav2vec2

    folder = save_tiny_wav2vec2(tmp_path / kind, kind=kind)
    prepared = prepare_model(job(folder, "audio_classification", finetune={"freeze_depth": 1}), ["a", "b"])
    assert prepared.stack.path == f"{kind}.encoder.layers" and prepared.head_names == ["projector", "classifier"]
    names = trainable(prepared.model)
    assert not any(n.startswith((f"{kind}.feature_extractor.", f"{kind}.encoder.layers.0.")) for n in names)
    assert any(n.startswith(f"{kind}.encoder.layers.1.") for n in names)
    out = prepared.model(input_values=torch.randn(2, 8000), labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and out.loss.requires_grad
