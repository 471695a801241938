"""Report figures: a matplotlib figure saved as a PNG, written whole (:mod:`engine.checkpoints.atomic`)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from engine.checkpoints.atomic import write_atomic


def save_fig(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as a PNG at ``path`` (written whole)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return write_atomic(path, buffer.getvalue())
