"""Offline spoken-word data synthesised with Debian's ``espeak-ng``: keywords and short sentences.

``shoulders data speech-keywords`` writes keyword clips (classification) and ``shoulders data speech-asr``
short command sentences with transcripts (ASR), each said by many voices (accents x voice variants) at
random speeds and pitches. Voice variants are split between train, validation and test, so test voices
are never heard in training. Output: ``wav/`` clips with ``{train,validation,test}.csv`` manifests
(``path,label,transcript``), or parquet files with the encoded audio bytes (``--format parquet``).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.checkpoints.atomic import atomic_path
from engine.errors import JobError

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
ASR_WORDS = ("go", "stop", "turn", "left", "right", "up", "down", "one", "two", "three", "four", "five", "fast", "slow")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
VOICES = {
    "train": ("m1", "m2", "m3", "m4", "f1", "f2", "f3"),
    "validation": ("m5", "f4"),
    "test": ("m6", "m7", "f5"),
}
"""espeak-ng voice variants per split: test voices are held out from training."""


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesise(text: str, voice: str, speed: int, pitch: int) -> bytes:
    """One utterance as wav bytes (espeak-ng writes 22.05 kHz mono)."""
    result = subprocess.run(
        ["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text],
        check=True, capture_output=True, timeout=30,
    )
    return result.stdout


def _encode(wav: bytes, rate: int | None) -> tuple[bytes, int]:
    """Re-encode espeak's wav (header sizes are unset on stdout) at ``rate`` (default: espeak's own)."""
    import soundfile as sf

    from engine.preprocessing.audio import resample

    samples, found = sf.read(io.BytesIO(wav), dtype="float32")
    target = rate or found
    buffer = io.BytesIO()
    sf.write(buffer, resample(samples, found, target), target, format="WAV", subtype="PCM_16")
    return buffer.getvalue(), target


def plan_utterances(kind: str, seed: int = 0, takes: int = 1) -> dict[str, list[dict[str, object]]]:
    """What to say per split: text, voice (accent+variant), speed and pitch; labels for keywords."""
    rng = random.Random(seed)
    plan: dict[str, list[dict[str, object]]] = {}
    for split, variants in VOICES.items():
        rows = []
        for accent in ACCENTS:
            for variant in variants:
                for _ in range(takes):
                    if kind == "keywords":
                        texts = [(w, w) for w in KEYWORDS]
                    else:
                        texts = [(None, " ".join(rng.choice(ASR_WORDS) for _ in range(rng.randint(2, 4)))) for _ in range(3)]
                    for label, text in texts:
                        rows.append({"text": text, "label": label, "voice": f"{accent}+{variant}",
                                     "speed": rng.randint(120, 210), "pitch": rng.randint(25, 75)})
        rng.shuffle(rows)
        plan[split] = rows
    return plan


def build_speech_data(kind: str, out_dir: str | os.PathLike, *, rate: int | None = None, fmt: str = "csv", takes: int = 1,
                      seed: int = 0, workers: int = 4) -> dict[str, int]:
    """Synthesise a keyword (``keywords``) or sentence (``asr``) set into ``out_dir``; returns rows per split.

    Args:
        kind: ``keywords`` (label = the word) or ``asr`` (transcript = the sentence).
        out_dir: output folder.
        rate: sampling rate of the written audio (default espeak's 22050 Hz; e.g. 8000 to try resampling).
        fmt: ``csv`` (wav files + csv manifests) or ``parquet`` (audio bytes inside the parquet files).
        takes: utterances per word (keywords) or 3-sentence groups (asr) per voice.
        seed: seed of speeds, pitches and sentences.
        workers: espeak-ng processes in parallel.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not espeak_available():
        raise JobError("espeak-ng is not installed: apt-get install espeak-ng (it synthesises the speech data offline)")
    out = Path(out_dir)
    counts = {}
    for split, rows in plan_utterances(kind, seed, takes).items():
        with ThreadPoolExecutor(workers) as pool:
            clips = list(pool.map(lambda r: _encode(synthesise(str(r["text"]), str(r["voice"]), int(r["speed"]), int(r["pitch"])), rate), rows))
        table = {
            "label": [r["label"] or "" for r in rows],
            "transcript": [str(r["text"]) for r in rows],
            "voice": [str(r["voice"]) for r in rows],
        }
        if fmt == "parquet":
            table = {"audio": [c for c, _ in clips], **table}
            out.mkdir(parents=True, exist_ok=True)
            with atomic_path(out / f"{split}.parquet") as tmp:
                pq.write_table(pa.table(table), tmp)
        else:
            (out / "wav" / split).mkdir(parents=True, exist_ok=True)
            paths = []
            for i, (clip, _) in enumerate(clips):
                rel = f"wav/{split}/{i:05d}.wav"
                (out / rel).write_bytes(clip)
                paths.append(rel)
            with atomic_path(out / f"{split}.csv") as tmp:
                pacsv.write_csv(pa.table({"path": paths, **table}), tmp)
        counts[split] = len(rows)
    return counts


def save_demo_models(models_dir: str | os.PathLike) -> list[Path]:
    """Write the tiny speech checkpoints the demo jobs name (kept when already there).

    No wav2vec2/Whisper weights install from a package registry, so the demo jobs fine-tune small
    models of the real architectures built from their config classes, saved like hub checkpoints.
    """
    from cluster.datagen.speech_models import save_tiny_wav2vec2, save_tiny_whisper

    root = Path(models_dir)
    builders = {
        "tiny-wav2vec2": lambda p: save_tiny_wav2vec2(p, hidden=64, layers=2),
        "tiny-whisper": lambda p: save_tiny_whisper(p, chunk_seconds=3, hidden=64),
    }
    written = []
    for name, build in builders.items():
        if not (root / name / "config.json").is_file():
            build(root / name)
        written.append(root / name)
    return written
