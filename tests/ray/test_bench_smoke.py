"""CI smoke test of the benchmark's CPU mode: every case runs on tiny shapes and the JSON is complete.

Not a timed test: on CPU the numbers mean nothing, only that the GPU run's code paths work.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_cpu_smoke_runs_every_case(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="sb-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"}
    # every case but wav2vec2 CTC through Ray: its wiring is the Whisper row's (one function), and its Ray path is
    # trained in tests/ray/test_speech.py; one Ray run fewer keeps CI under its time limit
    cases = "peers,engine_ray,engine_plain,engine_plain_alt,engine_chat,engine_whisper_full,engine_w2v2_ctc,engine_whisper_full_ray"
    cmd = [sys.executable, "-m", "benchmarks.bench", "--tiny", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
           "--warm", "1", "--steps", "1", "--timeout", "600", "--cases", cases]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "bench-cpu-tiny.json").read_text())
    rows = {r["case"]: r for r in result["rows"]}
    logs = {p.name: p.read_text()[-2000:] for p in (tmp_path / "work").glob("*.log")}
    expected = ("loop_lora", "engine_ray", "engine_plain", "engine_plain_alt", "engine_chat", "engine_whisper_full", "engine_w2v2_ctc",
                "engine_whisper_full_ray")
    assert set(rows) >= set(expected), logs
    for name in expected:
        assert "error" not in rows[name], (name, rows[name].get("error"), logs)
        assert (rows[name].get("tokens_per_s") or rows[name].get("samples_per_s") or 0) > 0
    # The engine's Ray row is the real `shoulders train` path: a report (eval + checkpoint) every `warm`
    # steps, the first window being the warm-up: 2 steps with warm=1 give 2 windows.
    assert rows["engine_ray"]["windows"] == 2 and len(rows["engine_ray"]["train_loss"]) == 2
    for speech in ("engine_whisper_full", "engine_w2v2_ctc"):
        assert rows[speech]["samples_per_s"] > 0 and rows[speech]["batch"] == 2, rows[speech]
        assert all(0 < loss < math.inf for loss in rows[speech]["train_loss"]), rows[speech]  # finite: targets fit the frames
    # through shoulders train: Ray Data decoded and featurised the wav bytes; a real (non-zero) loss
    ray_row = rows["engine_whisper_full_ray"]
    assert ray_row["windows"] == 2 and all(0 < loss < math.inf for loss in ray_row["train_loss"]), ray_row
    assert result["summary"]["whisper_full_ray_overhead_pct"]["variant"] == "base"
    # Instruction tuning: chat rows through the chat template, the LoRA fast path on the answer-only labels. Each row
    # renders to one sequence, half of it the answer (and its end-of-turn token): only those tokens are targets.
    chat = rows["engine_chat"]
    assert chat["job"]["data"]["layout"] == "chat" and chat["perf_plan"]["fused_lora"] > 0
    assert 0.45 < chat["target_token_share"] < 0.55, chat["target_token_share"]
    assert len(chat["train_loss"]) == 2 and all(0 < loss < math.inf for loss in chat["train_loss"]), chat
    # The alternative run flips FP8 on (emulated on CPU) and trains to the same losses within FP8 error.
    assert rows["engine_plain_alt"]["perf_plan"]["fp8"] and not rows["engine_plain"]["perf_plan"]["fp8"]
    assert result["summary"]["fp8_parity"]["max_rel_loss_diff"] < 0.05
    assert result["summary"]["ray_overhead_pct"]["plain_tokens_per_s"] > 0
    assert result["machine"]["card"] == "cpu" and result["machine"]["torch"]
    assert result["model_config"]["num_hidden_layers"] == 2
    assert "engine_ray" in proc.stdout.split("wrote ")[-1]  # the table is printed last
