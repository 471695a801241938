"""What a data split is once found: its files, format, rows and columns; local paths and URIs told apart."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.checkpoints.storage import is_uri  # noqa: F401  (one definition: the storage layer's)
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

def resolve_files(path: str, key: str) -> list[str]:
    """The data files a source names: a file, a folder (its data files) or a glob, on a local path or a URI
    (``s3://bucket/train/``, ``s3://bucket/train/*.parquet``), listed through :mod:`engine.checkpoints.storage`."""
    if is_uri(path):
        files = remote_files(path, key)
    else:
        local = os.path.expanduser(path.removeprefix("file://"))
        if os.path.isdir(local):
            files = sorted(str(p) for p in Path(local).rglob("*") if p.suffix.lower() in EXTENSIONS)
        else:
            files = sorted(glob.glob(local)) if any(c in local for c in "*?[") else ([local] if os.path.isfile(local) else [])
        files = [os.path.abspath(f) for f in files]
    if not files:
        raise JobError(
            f"{key}: '{path}' does not exist or holds no data files (.parquet, .jsonl, .csv). "
            "Fix the path (relative paths are relative to the directory you run shoulders from)."
        )
    return files


def remote_files(uri: str, key: str) -> list[str]:
    """The data files at a URI: the object itself, the data files under a prefix, or those matching a glob."""
    import fnmatch

    from engine.checkpoints import storage

    base, query = storage.split_query(uri)
    try:
        if any(c in base for c in "*?["):
            folder = base[: base.rfind("/", 0, min(base.find(c) for c in "*?[" if c in base))]
            listed = storage.list_folder(folder + query, recursive=True)
            return [f for f, kind in listed if kind == "file" and fnmatch.fnmatch(storage.split_query(f)[0], base)]
        kind = storage.file_type(uri)
        if kind == "file":
            return [uri]
        if kind == "dir":
            listed = storage.list_folder(uri, recursive=True)
            return [f for f, k in listed if k == "file" and Path(storage.split_query(f)[0]).suffix.lower() in EXTENSIONS]
        return []
    except JobError:
        raise
    except Exception as exc:  # pyarrow raises OSError and ArrowInvalid for storage failures
        raise JobError(f"{key}: could not list '{base}': {storage.storage_error(uri, exc)}") from None


def detect_format(files: list[str], declared: str, key: str) -> str:
    """The pyarrow format name of ``files`` (declared in ``data.format`` or from their extensions)."""
    if declared != "auto":
        return FORMAT_NAMES[declared]
    found = {EXTENSIONS.get(Path(f).suffix.lower()) for f in files}
    if None in found or len(found) != 1:
        raise JobError(f"{key}: cannot tell the format of {files[:3]}; set data.format to parquet, jsonl or csv.")
    return found.pop()
