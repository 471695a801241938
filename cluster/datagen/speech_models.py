"""Tiny speech checkpoints of real architectures, built offline from ``transformers`` config classes.

Each builder saves a model (2 blocks, hidden 32 by default) with the preprocessing a hub checkpoint
ships: a feature extractor, and for ASR a tokenizer (a character CTC vocabulary, or a byte-level BPE with
Whisper's special tokens and a generation config with its language and task tokens). The engine then
loads them through the same path a hub id takes; nothing here reaches a hub. ``shoulders data speech-*``
writes them for the speech demo jobs (random weights: they stand in for wav2vec2/Whisper, which no
package registry ships), and the tests build them in temporary folders.
"""

from __future__ import annotations

import json
from pathlib import Path

CHARS = list("abcdefghijklmnopqrstuvwxyz'")
WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
                    "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
CONV = dict(conv_dim=(32,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2))
"""wav2vec2's real strides (320 samples per frame at 16 kHz) with narrow channels."""


def save_ctc_vocab(path: Path) -> None:
    """A character CTC tokenizer (``|`` separates words), as wav2vec2 CTC checkpoints ship it."""
    from transformers import Wav2Vec2CTCTokenizer

    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    (path / "vocab.json").write_text(json.dumps(vocab))
    Wav2Vec2CTCTokenizer(str(path / "vocab.json"), pad_token="<pad>", unk_token="<unk>", word_delimiter_token="|").save_pretrained(path)


def save_tiny_wav2vec2(path: Path, kind: str = "wav2vec2", with_vocab: bool = True, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny ``wav2vec2`` / ``hubert`` / ``wavlm`` base model with its feature extractor (and CTC vocabulary)."""
    import torch
    import transformers
    from transformers import Wav2Vec2FeatureExtractor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_class = {"wav2vec2": transformers.Wav2Vec2Config, "hubert": transformers.HubertConfig, "wavlm": transformers.WavLMConfig}[kind]
    config = config_class(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=len(CHARS) + 3, pad_token_id=0,
        mask_time_prob=0.05, mask_time_length=2, layerdrop=0.0, **CONV,
    )
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True).save_pretrained(path)
    if with_vocab:
        save_ctc_vocab(path)
    return path


def whisper_tokenizer(path: Path):
    """A byte-level BPE over a small English corpus with Whisper's special tokens, saved as a Whisper tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator([" ".join(SENTENCE_WORDS)] * 4 + [" " + w for w in SENTENCE_WORDS], trainer)
    model_state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]]
    fast = WhisperTokenizerFast(vocab=model_state["vocab"], merges=merges, unk_token="<|endoftext|>",
                                bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS[1:]})
    fast.add_tokens(["<|endoftext|>"], special_tokens=True)
    fast.save_pretrained(path)
    return fast


SENTENCE_WORDS = "zero one two three four five six seven eight nine yes no up down left right on off stop go turn fast slow".split()


def save_tiny_whisper(path: Path, chunk_seconds: int = 2, hidden: int = 32) -> Path:
    """A tiny Whisper (2+2 blocks) for ``chunk_seconds`` windows, with feature extractor, tokenizer and generation config."""
    import torch
    import transformers
    from transformers import GenerationConfig, WhisperFeatureExtractor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = whisper_tokenizer(path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in WHISPER_SPECIALS}
    frames = chunk_seconds * 100
    config = transformers.WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, d_model=hidden, encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden,
        max_source_positions=frames // 2, max_target_positions=64, pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"], begin_suppress_tokens=None, suppress_tokens=None,
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"], max_length=64,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|de|>": ids["<|de|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=True,
    )
    model.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, chunk_length=chunk_seconds, hop_length=160).save_pretrained(path)
    return path
