"""``shoulders env`` and ``shoulders --version``: one line each for the engine, torch, the devices, Ray,
DeepSpeed and its ops, transformers, peft and the Hugging Face cache, in well under 3 s, importing neither
torch nor DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from cluster.cli.env import deepspeed_ops, env_lines


@pytest.mark.parametrize("argv", [["env"], ["--version"]])
def test_env_answers_fast_with_one_line_per_component(argv, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        from cluster.cli.main import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        print(json.dumps({{m: m in sys.modules for m in ("torch", "deepspeed", "ray", "transformers", "peft")}}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    *lines, loaded = proc.stdout.strip().splitlines()
    assert elapsed < 3.0, f"shoulders {' '.join(argv)} took {elapsed:.1f} s"
    assert not any(json.loads(loaded).values()), loaded
    starts = [line.split(" ")[0].rstrip(":") for line in lines]
    assert starts == ["shoulders", "torch", "devices", "Ray", "DeepSpeed", "transformers", "peft", "Hugging"], lines
    import torch  # the numbers printed are the installed ones

    assert lines[1].startswith(f"torch {torch.__version__} (")
    assert ("CPU build" in lines[1]) == (torch.version.cuda is None)
    assert "prebuilt ops:" in lines[4] and "JIT-compiled" in lines[4]
    assert str(tmp_path / "hub") in lines[7] and "offline" in lines[7]


def test_deepspeed_ops_found_in_the_extensions_cache(tmp_path, monkeypatch):
    op = tmp_path / "py311_cpu" / "cpu_adam"
    op.mkdir(parents=True)
    (op / "cpu_adam.so").write_bytes(b"")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    built, jit = deepspeed_ops()
    assert jit == ["cpu_adam"]
    assert isinstance(built, list)
    assert any("cpu_adam" in line for line in env_lines())
