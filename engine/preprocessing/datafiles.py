"""A pyarrow dataset over a split's files, whatever wrote them: parquet, jsonl and csv files, or the Arrow
*stream* files Hugging Face ``datasets`` keeps (its cache and ``save_to_disk`` folders).

pyarrow's ``dataset(format="arrow")`` reads only the Arrow IPC *file* format (with a footer); ``datasets``
writes the stream format, so those files are opened here as memory-mapped tables (no copy: their buffers are
the mapped file, as ``datasets`` itself reads them). No torch and no Ray here.
"""

from __future__ import annotations

import io
import os
from typing import Any

ARROW_STREAM = "arrow"
"""The format name of Hugging Face ``datasets``' Arrow stream files in a split's description."""


def read_arrow_stream(path: str) -> Any:
    """One Arrow stream file as a ``pyarrow.Table`` backed by the memory-mapped file."""
    import pyarrow as pa

    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).read_all()


def open_files(files: list[str], fmt: str) -> Any:
    """A lazy ``pyarrow.dataset.Dataset`` over ``files`` of one format (``parquet``, ``json``, ``csv`` or
    :data:`ARROW_STREAM`)."""
    import pyarrow.dataset as pads

    if fmt == ARROW_STREAM:
        return pads.dataset([read_arrow_stream(f) for f in files])
    from engine.checkpoints.storage import is_uri, resolve

    if files and is_uri(files[0]):  # object storage: the filesystem from the first URI, credentials from the environment
        filesystem = resolve(files[0])[0]
        return pads.dataset([resolve(f)[1] for f in files], format=fmt, filesystem=filesystem)
    return pads.dataset(files, format=fmt)


def media_source(value: Any, base_dir: str | None, kind: str, error: type[Exception] = ValueError, shown: str | None = None) -> Any:
    """What a decoder (soundfile, Pillow) opens for a column value: a path (relative to ``base_dir``), file bytes,
    or a {bytes, path} struct (Hugging Face ``Audio``/``Image`` features).

    Raises:
        error: the value is none of those (``shown`` names it in the message, ``kind`` says what it should be).
    """
    import numpy as np

    if isinstance(value, dict):
        if value.get("bytes") is not None and len(value["bytes"]):
            return io.BytesIO(bytes(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(value))
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return io.BytesIO(value.tobytes())
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise error(f"{kind} value {shown if shown is not None else str(value)[:60]!r} is neither a file path, file bytes nor a {{bytes, path}} struct")
    path = os.path.expanduser(str(value))
    if base_dir and not os.path.isabs(path) and "://" not in path:
        path = os.path.join(base_dir, path)
    return path
