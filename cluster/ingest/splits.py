"""What a data split is once found: its files, format, rows and columns; local paths and URIs told apart."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import JobError

EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}

FORMAT_NAMES = {"parquet": "parquet", "jsonl": "json", "csv": "csv"}

@dataclass
class SplitInfo:
    """One data split after checking: its files, format and row count."""

    name: str
    files: list[str]
    format: str
    num_rows: int
    columns: list[str] = field(default_factory=list)

@dataclass
class DataInfo:
    """What the checks learned about a job's data; travels to the workers in the loop config."""

    splits: dict[str, SplitInfo] = field(default_factory=dict)
    labels: list[str] | None = None

def is_uri(path: str) -> bool:
    """Whether ``path`` names a remote filesystem (``s3://``, ``gs://``, ...) rather than a local path."""
    return "://" in path and not path.startswith("file://")

def resolve_files(path: str, key: str) -> list[str]:
    """The data files a source names: a file, a folder (its data files) or a glob."""
    if is_uri(path):
        return [path]
    local = os.path.expanduser(path.removeprefix("file://"))
    if os.path.isdir(local):
        files = sorted(str(p) for p in Path(local).rglob("*") if p.suffix.lower() in EXTENSIONS)
    else:
        files = sorted(glob.glob(local)) if any(c in local for c in "*?[") else ([local] if os.path.isfile(local) else [])
    if not files:
        raise JobError(
            f"{key}: '{path}' does not exist or holds no data files (.parquet, .jsonl, .csv). "
            "Fix the path (relative paths are relative to the directory you run shoulders from)."
        )
    return [os.path.abspath(f) for f in files]

def detect_format(files: list[str], declared: str, key: str) -> str:
    """The pyarrow format name of ``files`` (declared in ``data.format`` or from their extensions)."""
    if declared != "auto":
        return FORMAT_NAMES[declared]
    found = {EXTENSIONS.get(Path(f).suffix.lower()) for f in files}
    if None in found or len(found) != 1:
        raise JobError(f"{key}: cannot tell the format of {files[:3]}; set data.format to parquet, jsonl or csv.")
    return found.pop()
