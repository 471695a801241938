"""engine.checkpoints.atomic: files and folders appear whole or not at all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.checkpoints.atomic import atomic_path, write_atomic


def test_write_atomic_replaces_a_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    assert write_atomic(path, "new ✓") == path
    assert path.read_text(encoding="utf-8") == "new ✓"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_folder_is_replaced_whole_and_a_stale_temporary_is_cleared(tmp_path):
    out = tmp_path / "export"
    (out / "old").mkdir(parents=True)
    (out / "old" / "weights").write_text("old")
    stale = tmp_path / "export.tmp"
    (stale / "half").mkdir(parents=True)
    with atomic_path(out) as tmp:
        assert tmp == stale and not tmp.exists()
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("complete")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_the_helper_imports_without_torch():
    code = "import sys, engine.checkpoints.atomic; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_nothing_else_renames_files_into_place():
    root = Path(__file__).parents[2]
    renames = [
        str(path.relative_to(root)) for package in ("engine", "cluster") for path in (root / package).rglob("*.py")
        if any(call in path.read_text() for call in ("os.replace(", "os.rename(", "tmp.replace(", "tmp.rename("))
    ]
    assert renames == ["engine/checkpoints/atomic.py"]
