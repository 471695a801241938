"""The backend section: DeepSpeed settings derived from the job, a user's DeepSpeed JSON merged and
checked for contradictions at validation (no torch, no deepspeed)."""

from __future__ import annotations

import json

import pytest

from engine.backends.ds_config import build_ds_config, job_ds_settings
from engine.config.schema import build_job, load_job
from engine.errors import JobError


def job(**sections):
    raw = {"model": {"name": "m"}, "data": {"train": "t"}, "optim": {"batch_size": 4, "grad_accum": 2, "max_grad_norm": 0.5}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return build_job(raw)


def ds_file(tmp_path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_micro_batch_contradiction_fails_validation_naming_both_values(tmp_path):
    path = ds_file(tmp_path, {"train_micro_batch_size_per_gpu": 8})
    with pytest.raises(JobError) as err:
        job(backend={"name": "deepspeed", "config": path})
    message = str(err.value)
    assert "train_micro_batch_size_per_gpu' is 8" in message and "optim.batch_size gives 4" in message


def test_contradictions_are_all_named(tmp_path):
    path = ds_file(tmp_path, {
        "gradient_accumulation_steps": 4, "gradient_clipping": 1.0, "zero_optimization": {"stage": 3},
        "bf16": {"enabled": True}, "optimizer": {"type": "Adam"},
    })
    with pytest.raises(JobError) as err:
        job(backend={"name": "deepspeed", "config": path, "zero_stage": 2}, optim={"precision": "fp32"})
    message = str(err.value)
    for expected in ("optim.grad_accum gives 2", "optim.max_grad_norm gives 0.5", "backend.zero_stage gives 2",
                     "optim.precision gives False", "remove 'optimizer'"):
        assert expected in message


def test_agreeing_and_auto_values_merge_and_the_job_fills_the_rest(tmp_path):
    path = ds_file(tmp_path, {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2, "train_batch_size": 16,
        "zero_optimization": {"stage": 3, "overlap_comm": False, "offload_optimizer": {"device": "cpu"}},
    })
    spec = job(backend={"name": "deepspeed", "config": path}, scaling={"num_workers": 2})
    assert isinstance(spec.backend.config, dict)  # read once, carried inline to the workers
    config = build_ds_config(spec, world_size=2, bf16_supported=False)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 16
    assert config["gradient_clipping"] == 0.5
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is False  # the user's extra setting kept
    assert zero["offload_optimizer"]["device"] == "cpu" and config["zero_force_ds_cpu_optimizer"] is False
    assert config["bf16"]["enabled"] is False and config["zero_allow_untested_optimizer"] is True


def test_job_settings_without_a_json():
    spec = job(backend={"name": "deepspeed"}, scaling={"num_workers": 3})
    settings = job_ds_settings(spec)
    assert settings[("zero_optimization", "stage")] == 2  # the default stage
    assert settings[("train_batch_size",)] == 4 * 2 * 3
    assert ("bf16", "enabled") not in settings  # precision auto: decided on the device
    assert build_ds_config(spec, 3, bf16_supported=True)["bf16"]["enabled"] is True


@pytest.mark.parametrize(
    "backend, message",
    [
        ({"name": "ddp", "zero_stage": 2}, "backend.zero_stage is set but backend.name is 'ddp'"),
        ({"name": "deepspeed", "zero_stage": 2, "offload_params": True}, "offload_params needs ZeRO stage 3"),
        ({"name": "deepspeed", "zero_stage": 0, "offload_optimizer": True}, "offload_optimizer needs ZeRO stage 1, 2 or 3"),
        ({"name": "deepspeed", "zero_stage": 4}, "backend.zero_stage"),
        ({"name": "deepspeed", "config": "/no/such/ds.json"}, "'/no/such/ds.json' does not exist"),
    ],
)
def test_invalid_backend_sections(backend, message):
    with pytest.raises(JobError, match=message.replace("(", r"\(").replace(")", r"\)")):
        job(backend=backend)


def test_gradual_unfreezing_is_refused_with_deepspeed():
    with pytest.raises(JobError, match="not supported with backend.name 'deepspeed'"):
        job(backend={"name": "deepspeed"}, finetune={"freeze_depth": 1}, safeguards={"unfreeze_every_steps": 5})


def test_shipped_deepspeed_job_validates():
    from pathlib import Path

    spec = load_job(Path(__file__).parents[2] / "jobs" / "deepspeed_zero2_lora.yaml")
    assert spec.backend.name == "deepspeed" and spec.peft.method == "lora"


def test_only_the_deepspeed_backend_imports_deepspeed():
    import re
    from pathlib import Path

    root = Path(__file__).parents[2]
    pattern = re.compile(r"^\s*(import deepspeed|from deepspeed)", re.M)
    importers = sorted(str(p.relative_to(root)) for d in ("engine", "cluster") for p in (root / d).rglob("*.py") if pattern.search(p.read_text()))
    assert importers == ["engine/backends/deepspeed.py"]


def test_validating_a_deepspeed_job_needs_no_torch(tmp_path):
    import subprocess
    import sys

    path = ds_file(tmp_path, {"train_micro_batch_size_per_gpu": 4})
    code = (
        "import sys; from engine.config.schema import build_job; "
        f"build_job({{'model': {{'name': 'm'}}, 'data': {{'train': 't'}}, 'optim': {{'batch_size': 4}}, "
        f"'backend': {{'name': 'deepspeed', 'config': {path!r}}}}}); "
        "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
