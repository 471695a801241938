"""The benchmark's workloads: the peer's model shapes, written as a model folder, a tokenizer and data files
that ``shoulders train`` reads like any user's.

The shapes come from ``shared/bench/peer_baseline.py`` itself (imported, not copied): ``llama_cfg()``,
``SEQ``, ``MB`` and ``lora_flops_per_token()``. Weights are random (``model.from_scratch``); throughput does
not depend on them. The text is random words of a word-level tokenizer with the model's vocabulary size, so
every row tokenizes to exactly ``seq`` tokens and the engine's Ray Data path (read -> tokenize -> stream)
does real work.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEER_CANDIDATES = (
    ROOT.parent / "shared" / "bench" / "peer_baseline.py",
    ROOT / "shared" / "bench" / "peer_baseline.py",
    ROOT / ".peer" / "peer_baseline.py",
    ROOT / "benchmarks" / "vendor" / "peer_baseline.py",  # unchanged copy, for clones without ../shared (CI)
)


def peer_script() -> Path:
    """Where ``peer_baseline.py`` is: ``../shared/bench`` beside the checkout, or a copy carried in ``.peer/``."""
    for path in PEER_CANDIDATES:
        if path.is_file():
            return path
    raise FileNotFoundError(f"peer_baseline.py not found in {[str(p) for p in PEER_CANDIDATES]}")


def load_peer(tiny: bool, micro_batch: int | None = None) -> Any:
    """Import ``peer_baseline.py`` as a module (its argparse reads ``sys.argv``, so set it for the import)."""
    argv = ["peer_baseline.py"] + (["--tiny"] if tiny else []) + ([f"--mb={micro_batch}"] if micro_batch else [])
    saved, sys.argv = sys.argv, argv
    try:
        spec = importlib.util.spec_from_file_location("peer_baseline", peer_script())
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.argv = saved
    return module


SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose vocabulary is ``<pad> <unk> <s> </s> w4 ... w{vocab_size-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def write_lm_workload(folder: Path, tiny: bool, micro_batch: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Model folder (config + tokenizer, no weights), train/validation parquet; returns paths and shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    peer = load_peer(tiny, micro_batch)
    cfg = peer.llama_cfg()
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 2, 3
    cfg.use_cache = False
    model_dir = folder / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(model_dir)
    write_tokenizer(model_dir, cfg.vocab_size)
    rng = np.random.default_rng(seed)
    seq = peer.SEQ

    def rows(n: int) -> list[str]:
        ids = rng.integers(len(SPECIALS), cfg.vocab_size, size=(n, seq))
        return [" ".join(f"w{i}" for i in row) for row in ids]

    data = folder / "data"
    data.mkdir(exist_ok=True)
    pq.write_table(pa.table({"text": rows(micro_batch * steps)}), data / "train.parquet")
    pq.write_table(pa.table({"text": rows(micro_batch)}), data / "validation.parquet")
    flops, n_params = peer.lora_flops_per_token(cfg)
    return {
        "model_dir": str(model_dir), "train": str(data / "train.parquet"), "validation": str(data / "validation.parquet"),
        "seq": seq, "micro_batch": micro_batch, "rows": micro_batch * steps, "flops_per_token": flops, "params_compute": n_params,
        "model_config": json.loads(cfg.to_json_string()),
    }


def lm_job(workload: dict[str, Any], out_dir: Path, warm: int, steps: int, gpu: bool, perf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job ``shoulders train`` runs for the 1B-shape LoRA case (as a dict; YAML-equivalent)."""
    return {
        "name": "bench-lora",
        "model": {"name": workload["model_dir"], "task": "causal_lm", "from_scratch": True},
        "data": {"train": workload["train"], "validation": workload["validation"], "max_length": workload["seq"],
                 "rows_per_block": workload["micro_batch"]},
        "finetune": {"strategy": "lora", "head_lr": 1e-4},
        "peft": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        **timed_run(workload["micro_batch"], out_dir, warm, steps, gpu, perf),
    }


CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)
"""The chat workload's template, in the word-level tokenizer's terms: each turn is ``<s> role content </s>``
(3 tokens besides its content; role names are ``<unk>`` to this vocabulary); ``</s>`` ends an answer."""


def write_chat_workload(workload: dict[str, Any], seed: int = 1) -> dict[str, Any]:
    """Instruction data for the LM workload's model: one user turn and one answer per row, each half the
    sequence, rendered by :data:`CHAT_TEMPLATE` to exactly ``seq`` tokens (so the loss is on about half of
    them: the answer and its ``</s>``). Written beside the LM data; returns the workload with ``chat_train``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seq, vocab = workload["seq"], workload["model_config"]["vocab_size"]
    rng = np.random.default_rng(seed)
    user_words, answer_words = seq // 2 - 3, seq - seq // 2 - 3

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(len(SPECIALS), vocab, size=n))

    rows = workload["micro_batch"] * (workload["rows"] // workload["micro_batch"])
    chats = [[{"role": "user", "content": words(user_words)}, {"role": "assistant", "content": words(answer_words)}] for _ in range(rows)]
    path = Path(workload["train"]).parent / "chat_train.parquet"
    pq.write_table(pa.table({"messages": chats}), path)
    return {**workload, "chat_train": str(path)}


def chat_job(workload: dict[str, Any], out_dir: Path, warm: int, steps: int, gpu: bool, perf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The LoRA job on chat rows (:func:`write_chat_workload`): ``data.layout: chat``, loss on the answers only."""
    job = lm_job(workload, out_dir, warm, steps, gpu, perf)
    job["name"] = "bench-chat-lora"
    job["data"].update(train=workload["chat_train"], layout="chat", chat_template=CHAT_TEMPLATE)
    return job


def timed_run(batch: int, out_dir: Path, warm: int, steps: int, gpu: bool, perf: dict[str, Any] | None) -> dict[str, Any]:
    """The job sections every benchmark job shares: ``warm + steps`` steps at a constant LR on one worker, a
    report (eval + checkpoint) every ``warm`` steps, no export."""
    return {
        "optim": {"batch_size": batch, "max_steps": warm + steps, "warmup_ratio": 0.0, "precision": "bf16" if gpu else "fp32",
                  "schedule": "constant"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1.0 if gpu else 0.5},
        "eval": {"every_n_steps": warm, "batch_size": batch},
        "output": {"dir": str(out_dir), "export": "none", "keep_checkpoints": 1},
        "perf": perf or {},
    }


def speech_model(kind: str, tiny: bool) -> tuple[Any, int, dict[str, Any]]:
    """(model, batch size, one random batch's shapes) for the peer's speech cases.

    The shapes mirror ``peer_baseline.py``'s ``case_whisper_full`` and ``case_w2v2_ctc`` (their configs are
    built inside those functions, so they cannot be imported): Whisper-small, 30 s log-mel windows,
    96 target tokens, batch 32; wav2vec2-base CTC, 10 s raw audio, 120 targets, batch 16, feature
    encoder frozen.
    """
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, WhisperConfig, WhisperForConditionalGeneration

    if kind == "whisper_full":
        if tiny:
            cfg = WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=1000, num_mel_bins=80, max_source_positions=1500,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
        else:
            cfg = WhisperConfig(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                                decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, vocab_size=51865,
                                num_mel_bins=80, max_source_positions=1500)
        cfg._attn_implementation = "sdpa"
        batch = 2 if tiny else 32
        return WhisperForConditionalGeneration(cfg), batch, {"input_features": (batch, 80, 3000), "labels": (batch, 96, cfg.vocab_size)}
    if tiny:
        cfg = Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=32, conv_dim=(32,) * 7)
    else:
        cfg = Wav2Vec2Config(vocab_size=32)
    cfg._attn_implementation = "sdpa"
    batch, samples = (2, 16000) if tiny else (16, 160000)
    model = Wav2Vec2ForCTC(cfg)
    model.freeze_feature_encoder()
    # 120 targets fit the 499 frames of 10 s; the tiny 1 s clips have 49 frames, so 8 targets (CTC needs <= frames)
    return model, batch, {"input_values": (batch, samples), "labels": (batch, 8 if tiny else 120, 32)}


SPEECH_SECONDS = {"whisper_full": 30, "w2v2_ctc": 10}
"""Clip length of each speech shape (the peer's: 30 s log-mel windows, 10 s raw audio)."""
SPEECH_TARGET_TOKENS = {"whisper_full": 96, "w2v2_ctc": 120}


def write_speech_workload(folder: Path, kind: str, tiny: bool, steps: int, seed: int = 0, files: int = 1) -> dict[str, Any]:
    """A speech shape as ``shoulders train`` reads it: a model folder (the peer's config, its feature extractor
    and a tokenizer, no weights: ``model.from_scratch``) and parquet audio (wav bytes + transcript).

    The clips are noise of the shape's full length, so the Ray Data path decodes and featurises what the
    peer's random tensors stand for; the transcripts are random words of about the peer's target length.
    """
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    from cluster.datagen.speech_models import SENTENCE_WORDS, save_ctc_vocab, save_tiny_whisper

    model, batch, _ = speech_model(kind, tiny)
    config = model.config
    del model
    model_dir = folder / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    seconds = SPEECH_SECONDS[kind] if not tiny else (30 if kind == "whisper_full" else 1)
    if kind == "whisper_full":  # tokenizer, generation config and 30 s feature extractor of a tiny Whisper; the peer's shape
        tiny_config = json.loads((save_tiny_whisper(model_dir, chunk_seconds=30) / "config.json").read_text())
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "begin_suppress_tokens", "suppress_tokens"):
            setattr(config, key, tiny_config.get(key))
        (model_dir / "model.safetensors").unlink(missing_ok=True)
    else:
        from transformers import Wav2Vec2FeatureExtractor

        save_ctc_vocab(model_dir)
        config.vocab_size, config.pad_token_id = len(json.loads((model_dir / "vocab.json").read_text())), 0
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                 return_attention_mask=True).save_pretrained(model_dir)
    config.save_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    # about the peer's target length (Whisper: ~2 BPE tokens a word; CTC: ~5 characters); tiny clips hold 3 words
    words_per_row = 3 if tiny else SPEECH_TARGET_TOKENS[kind] // (2 if kind == "whisper_full" else 5)

    def rows(n: int) -> dict[str, list[Any]]:
        audio, text = [], []
        for i in range(n):
            buffer = io.BytesIO()
            sf.write(buffer, (0.1 * rng.standard_normal(16000 * seconds)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
            audio.append({"bytes": buffer.getvalue(), "path": f"clip{i}.wav"})
            text.append(" ".join(rng.choice(SENTENCE_WORDS, size=words_per_row)))
        return {"audio": audio, "transcript": text}

    data = folder / "data"
    data.mkdir(exist_ok=True)
    train = data / "train.parquet" if files == 1 else data / "train"
    train.parent.mkdir(exist_ok=True)
    if files > 1:  # a folder of parquet files (the ingest benchmark streams them)
        train.mkdir(exist_ok=True)
    for f in range(files):
        # row groups of a micro-batch of clips, as audio datasets are written (a reader cannot split a row group)
        pq.write_table(pa.table(rows(batch * steps // files)), train if files == 1 else train / f"part-{f:03d}.parquet", row_group_size=batch)
    pq.write_table(pa.table(rows(batch)), data / "validation.parquet")
    return {"kind": kind, "model_dir": str(model_dir), "train": str(train), "validation": str(data / "validation.parquet"),
            "batch": batch, "seconds": seconds, "model_config": json.loads(config.to_json_string())}


def speech_job(workload: dict[str, Any], out_dir: Path, warm: int, steps: int, gpu: bool, perf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job ``shoulders train`` runs for a speech shape: a full fine-tune, as the peer's loop."""
    whisper = workload["kind"] == "whisper_full"
    return {
        "name": f"bench-{workload['kind']}",
        "model": {"name": workload["model_dir"], "task": "speech_seq2seq" if whisper else "ctc", "from_scratch": True,
                  **({"language": "en"} if whisper else {})},
        "data": {"train": workload["train"], "validation": workload["validation"], "audio_column": "audio",
                 "transcript_column": "transcript", "max_audio_seconds": workload["seconds"],
                 "max_length": SPEECH_TARGET_TOKENS[workload["kind"]], "rows_per_block": workload["batch"]},
        "finetune": {"strategy": "full", "head_lr": 1e-5, "backbone_lr_ratio": 1.0},
        **timed_run(workload["batch"], out_dir, warm, steps, gpu, perf),
    }
