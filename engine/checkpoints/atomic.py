"""Files and folders written whole: to a temporary sibling, then renamed into place.

The one way the engine and the driver write anything a reader might open mid-write (checkpoints, exports,
metrics, reports, generated data). Torch-free, so the driver's ``validate`` path may import it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``<path>.tmp`` to write a file or a folder at; when the block ends without an error it replaces
    ``path`` (a folder there is removed first), and when the block raises it is removed and ``path`` is left
    as it was. A stale ``<path>.tmp`` from an interrupted write is cleared before the block starts."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir():
        shutil.rmtree(path)  # os.replace moves a folder only onto a missing or empty one
    os.replace(tmp, path)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` whole; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def published_once(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a private temporary sibling to write a folder at; when the block ends it becomes ``path`` unless
    another process published ``path`` first (then this copy is dropped). For caches that several processes of
    one node may fill at once: each writes its own copy, none removes another's, readers see a whole folder."""
    import tempfile

    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if not path.exists():
            with contextlib.suppress(OSError):  # lost the race to another process: its copy stands
                os.rename(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)
