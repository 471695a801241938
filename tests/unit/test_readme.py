"""The README starts on one screen (what it is, install, quickstart, in the first 60 lines), its quickstart numbers
agree, and the contributor's material lives in CONTRIBUTING.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_first_screen_holds_what_it_is_install_and_the_quickstart():
    lines = (ROOT / "README.md").read_text().splitlines()
    first = "\n".join(lines[:60])
    assert lines[0] == "# shoulders" and "fine-tune" in first.lower()
    assert "## Install" in first and "pip install" in first and "use_gpu" in first and "gpu" in first
    assert "## Quickstart" in first and "shoulders data quickstart" in first and "shoulders train jobs/quickstart.yaml" in first
    order = [next(i for i, line in enumerate(lines) if line.startswith(h)) for h in
             ("## Install", "## Quickstart", "## Commands", "## Recipes", "## Reference")]
    assert order == sorted(order)


def test_quickstart_numbers_agree_and_unbacked_claims_are_gone():
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quickstart"):readme.index("## Commands")]
    presets = readme[readme.index("### Presets on the quickstart"):]
    full_row = next(line for line in presets.splitlines() if line.startswith("| `full`"))
    accuracy = re.search(r"\*\*(0\.\d+) test accuracy\*\*", quick).group(1)
    assert f"{accuracy} ±" in full_row and "bd8e913" in quick and "bd8e913" in presets
    for claim in ("~0.25", "about 2.5 minutes", "0.85 test accuracy", "1.54x"):
        assert claim not in readme, claim


def test_layout_and_adding_a_task_live_in_contributing():
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "## Layout" in contributing and "## Adding a task" in contributing
    assert "## Layout" not in readme and "## Adding a task" not in readme and "CONTRIBUTING.md" in readme
