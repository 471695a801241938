"""Writing report files (markdown, CSV, PNG figures) whole: to a temporary name, then renamed into place."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed into place (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def save_fig(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as a PNG at ``path`` (written whole)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return write_atomic(path, buffer.getvalue())
