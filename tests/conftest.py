"""Shared fixtures: tiny models saved to temporary folders, tiny datasets, one Ray instance per session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# A Hugging Face cache of this session's own: tests put tiny models in it laid out as the hub's cache, and load
# them by hub id offline, through the code path a user's hub id takes (Ray's workers inherit it).
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="shoulders-hf-")

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
    from cluster.datagen.speech_models import save_tiny_wav2vec2

    return save_tiny_wav2vec2(tmp_path_factory.mktemp("tiny-wav2vec2"))


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """Tiny Whisper (2+2 blocks, 2-second window) with feature extractor, tokenizer and generation config."""
    from cluster.datagen.speech_models import save_tiny_whisper

    return save_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="session")
def hub_bert() -> str:
    """A tiny BERT in the session's Hugging Face cache as the hub lays it out; returns its hub id."""
    return tiny.save_to_hub_cache("shoulders-test/tiny-bert", lambda folder: tiny.save_tiny_model("bert", folder))


def start_other_ray(temp: Path) -> subprocess.Popen:
    """``ray start --head --block`` in ``temp``; returns once its raylet says it started. On a loaded machine a
    raylet may die while starting (its dashboard agent too slow to write its port file): then it tries again."""
    from cluster.run.trainer import free_port

    env = {**os.environ, "RAY_TMPDIR": str(temp)}
    for attempt in range(3):
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=1",
               "--include-dashboard=false", f"--temp-dir={temp / str(attempt)}", "--disable-usage-stats"]
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if any("Raylet of id" in p.read_text(errors="replace") for p in (temp / str(attempt)).rglob("raylet.out")):
                return process
            time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the GCS and raylet it started go too
        process.wait()
    raise RuntimeError(f"a second Ray instance did not start in 3 tries; see {temp}")


@pytest.fixture(scope="session")
def other_ray():
    """A second Ray instance on this host (``ray start --head``), as users run beside shoulders: every Ray test
    runs with it up, and shoulders' embedded instance must neither join it nor confuse its own processes."""
    temp = Path(tempfile.mkdtemp(prefix="other-ray-"))  # short: Ray's socket paths have a length limit
    process = start_other_ray(temp)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server on loopback (SeaweedFS) with a bucket; its AWS variables are set for the whole session
    (before the session's Ray starts, so its workers reach it as a cloud node's would). Stopped by pid at the end
    without waiting for it to exit (~10 s)."""
    from s3_server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory, other_ray, s3):
    """One local Ray per test session with 4 logical CPUs (fractional workers leave room for Ray Data)."""
    import ray

    from cluster.run.trainer import start_embedded_ray

    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    start_embedded_ray(num_cpus=4)  # as shoulders does: Train's placement-group cleaner finds this instance only
    try:
        yield ray
    finally:
        ray.shutdown()
