"""Tiny speech checkpoints and synthetic clips for tests, built offline (no hub, no espeak-ng needed).

The checkpoint builders live in ``cluster.datagen.speech_models`` (``shoulders data speech-*`` uses them too).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np



def tone_word(word: str, rate: int, seconds: float, rng: random.Random) -> np.ndarray:
    """A synthetic 'spoken word': a chirp whose pitch and rhythm depend on the word, with random speaker jitter."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(word))
    base = 200 + seed % 600
    t = np.arange(int(rate * seconds)) / rate
    pitch = rng.uniform(0.85, 1.15)
    wave = np.sin(2 * math.pi * base * pitch * t * (1 + 0.3 * np.sin(2 * math.pi * (1 + seed % 5) * t)))
    return (0.3 * wave + 0.01 * np.random.default_rng(rng.randrange(1 << 30)).standard_normal(t.size)).astype(np.float32)


def write_tone_keywords(folder: Path, words: tuple[str, ...] = ("yes", "no", "up"), rate: int = 16000, per_word: int = 12,
                        seconds: float = 0.5, stereo: bool = False) -> dict[str, Path]:
    """wav files and csv manifests (path,label,transcript) for train/validation/test, without espeak-ng."""
    import soundfile as sf

    rng = random.Random(0)
    folder = Path(folder)
    out = {}
    for split, n in {"train": per_word, "validation": max(per_word // 3, 1), "test": max(per_word // 3, 1)}.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        lines = ["path,label,transcript"]
        for word in words:
            for i in range(n):
                audio = tone_word(word, rate, seconds * rng.uniform(0.7, 1.0), rng)
                if stereo:
                    audio = np.stack([audio, 0.5 * audio], axis=1)
                rel = f"{split}/{word}_{i}.wav"
                sf.write(folder / rel, audio, rate)
                lines.append(f"{rel},{word},{word}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
        out[split] = folder / f"{split}.csv"
    return out
