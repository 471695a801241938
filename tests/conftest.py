"""Shared fixtures: tiny models saved to temporary folders, tiny datasets, one Ray instance per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return tiny.save_tiny_model("bert", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny.save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_lm(tmp_path_factory) -> Path:
    return tiny.save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-lm"), task="causal_lm")


@pytest.fixture(scope="session")
def topic_data(tmp_path_factory) -> dict[str, Path]:
    return tiny.write_topic_data(tmp_path_factory.mktemp("topics"), files=3)


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory) -> dict[str, Path]:
    return tiny.write_lm_data(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="session")
def tiny_wav2vec2(tmp_path_factory) -> Path:
    """Tiny wav2vec2 (2 blocks, hidden 32) with its feature extractor and a character CTC vocabulary."""
    import tiny_speech

    return tiny_speech.save_tiny_wav2vec2(tmp_path_factory.mktemp("tiny-wav2vec2"))


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """Tiny Whisper (2+2 blocks, 2-second window) with feature extractor, tokenizer and generation config."""
    import tiny_speech

    return tiny_speech.save_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray per test session with 4 logical CPUs (fractional workers leave room for Ray Data)."""
    import ray

    from cluster.trainer import start_embedded_ray

    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    start_embedded_ray(num_cpus=4)  # as shoulders does: Train's placement-group cleaner finds this instance only
    try:
        yield ray
    finally:
        ray.shutdown()
