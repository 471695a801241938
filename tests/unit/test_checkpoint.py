"""Checkpoints: complete only with every rank's manifest, RNG states round-trip, a truncated checkpoint is
skipped for the previous complete one."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest
import torch
from torch import nn

from engine.backends.ddp import DDPBackend
from engine.checkpoints.store import (
    WEIGHTS, RunFolder, capture_rng, checkpoint_name, incomplete_reason, is_complete, next_restart_index, open_latest_complete, read_checkpoint, restore_checkpoint,
    restore_rng, resume_candidates, save_checkpoint,
)
from engine.config.schema import build_job


class TinyOut:
    def __init__(self, loss):
        self.loss = loss


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x, labels):
        return TinyOut(nn.functional.cross_entropy(self.head(torch.relu(self.frozen(x))), labels))


def make_backend(seed: int = 0) -> DDPBackend:
    torch.manual_seed(seed)
    model = Tiny()
    job = build_job({"model": {"name": "x"}, "data": {"train": "t"}, "optim": {"grad_accum": 2}})
    groups = [{"name": "head", "params": list(model.head.parameters()), "lr": 0.1, "initial_lr": 0.1, "weight_decay": 0.0}]
    return DDPBackend(job, model, groups, total_steps=10, warmup_steps=2, device=torch.device("cpu"), world_size=1)


def train_steps(backend: DDPBackend, n: int) -> None:
    for _ in range(n * 2):
        x = torch.randn(8, 4)
        backend.forward_backward({"x": x, "labels": (x.sum(1) > 0).long()})
        backend.step()


def write(tmp_path: Path, name: str, backend: DDPBackend, step: int) -> Path:
    return save_checkpoint(
        tmp_path / name, backend=backend, rank=0, world_size=1, state={"train": {"step": step}},
        job={"name": "t"}, rank_state={"sample_ids": [1, 2]},
    )


def test_save_restore_continues_bit_for_bit(tmp_path):
    a = make_backend()
    train_steps(a, 3)
    folder = write(tmp_path, checkpoint_name(3, 0), a, 3)
    assert is_complete(folder)
    train_steps(a, 2)  # the uninterrupted continuation

    b = make_backend()  # the same pre-trained (frozen) weights, a different head and RNG state
    with torch.no_grad():
        b.module.head.weight.add_(1.0)
    torch.manual_seed(123)
    state, position = restore_checkpoint(folder, backend=b, rank=0, world_size=1)
    assert state == {"train": {"step": 3}} and position == {"sample_ids": [1, 2]}
    train_steps(b, 2)
    for (name, pa), (_, pb) in zip(a.module.named_parameters(), b.module.named_parameters()):
        assert torch.equal(pa, pb), name
    assert b.group_lrs() == a.group_lrs() and b.scheduler.last_epoch == a.scheduler.last_epoch == 5


def test_frozen_weights_stay_out_of_the_checkpoint(tmp_path):
    folder = write(tmp_path, "c", make_backend(), 0)
    assert set(read_checkpoint(folder)["weights"]) == {"head.weight", "head.bias"}


def test_rng_states_round_trip():
    generator = torch.Generator().manual_seed(5)
    tensors, meta = capture_rng({"g": generator})
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=generator))
    torch.manual_seed(99), np.random.seed(99), random.seed(99), generator.manual_seed(99)
    restore_rng(tensors, json.loads(json.dumps(meta)), {"g": generator})
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=generator))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])


def test_checkpoint_is_incomplete_without_every_rank_or_with_a_short_file(tmp_path):
    folder = write(tmp_path, "c", make_backend(), 0)
    manifest = json.loads((folder / "manifest-rank0.json").read_text())
    manifest["world_size"] = 2  # rank 1's part never arrived
    (folder / "manifest-rank0.json").write_text(json.dumps(manifest))
    assert not is_complete(folder)
    assert "manifest-rank1.json is missing" in incomplete_reason(folder)
    manifest["world_size"] = 1
    (folder / "manifest-rank0.json").write_text(json.dumps(manifest))
    assert is_complete(folder)
    weights = folder / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-10])
    assert not is_complete(folder)
    size = len(weights.read_bytes())
    assert f"{WEIGHTS} has {size} bytes, rank 0's manifest recorded {size + 10}" in incomplete_reason(folder)
    with pytest.raises(ValueError, match=f"incomplete: {WEIGHTS} has {size} bytes"):
        read_checkpoint(folder)


def test_restore_refuses_another_world_size(tmp_path):
    folder = write(tmp_path, "c", make_backend(), 0)
    with pytest.raises(ValueError, match="scaling.num_workers to 1"):
        restore_checkpoint(folder, backend=make_backend(), rank=0, world_size=2)


def test_resume_candidates_are_the_checkpoint_folders_newest_first():
    names = [checkpoint_name(s, r) for s, r in [(2, 0), (4, 0), (6, 0), (4, 1)]] + ["other", "checkpoint_manager_snapshot.json"]
    assert resume_candidates(names) == [checkpoint_name(6, 0), checkpoint_name(4, 1), checkpoint_name(4, 0), checkpoint_name(2, 0)]


def test_truncated_checkpoint_is_skipped_with_a_warning_for_the_previous_complete_one(tmp_path, caplog):
    run = RunFolder(pyarrow.fs.LocalFileSystem(), str(tmp_path))
    with open_latest_complete(run) as folder:  # an empty run folder: a fresh start
        assert folder is None
    assert next_restart_index(run) == 0
    backend = make_backend()
    older = write(tmp_path, checkpoint_name(2, 0), backend, 2)
    newest = write(tmp_path, checkpoint_name(4, 0), backend, 4)
    with open_latest_complete(run) as folder:  # the newest on storage, whether or not Ray registered it
        assert folder == newest
    (newest / "manifest-rank0.json").unlink()  # the write was cut short before the manifest
    with caplog.at_level(logging.WARNING), open_latest_complete(run) as folder:
        assert folder == older
    assert f"skipping checkpoint '{newest}': manifest-rank0.json is missing" in caplog.text

    assert next_restart_index(run) == 1
    write(tmp_path, checkpoint_name(6, 3), backend, 6)
    assert next_restart_index(run) == 4
    with open_latest_complete(run) as folder:
        assert folder == tmp_path / checkpoint_name(6, 3)
    for folder in (older, tmp_path / checkpoint_name(6, 3)):
        (folder / WEIGHTS).write_bytes(b"")
    caplog.clear()
    with caplog.at_level(logging.WARNING), open_latest_complete(run) as folder:  # nothing complete: from step 0
        assert folder is None
    assert "starts from step 0" in caplog.text


def test_an_unfinished_run_needs_resume_and_resume_needs_a_run(tmp_path):
    from cluster.preflight.output import RAY_RUN_SNAPSHOT, check_output
    from engine.errors import JobError

    spec = build_job({"model": {"name": "m"}, "data": {"train": "t"}, "output": {"dir": str(tmp_path / "out")}})
    check_output(spec)  # a fresh folder: fine
    with pytest.raises(JobError, match="no run to resume"):
        check_output(spec, resume=True)
    (tmp_path / "out" / "train" / "checkpoint_000000002_000").mkdir(parents=True)  # written, never registered
    with pytest.raises(JobError, match="Pass --resume"):
        check_output(spec)
    check_output(spec, resume=True)
    (tmp_path / "out" / "train" / "checkpoint_000000002_000").rmdir()
    check_output(spec)  # an empty run folder: nothing began
    (tmp_path / "out" / "train" / RAY_RUN_SNAPSHOT).write_text("{}")
    with pytest.raises(JobError, match="Pass --resume"):
        check_output(spec)
    check_output(spec, resume=True)


def test_the_best_model_may_be_a_checkpoint_ray_never_registered_and_the_other_stale_ones_are_removed(tmp_path):
    import ray.train

    from cluster.run.trainer import pick_best, remove_stale_checkpoints, unregistered_checkpoints

    spec = build_job({"model": {"name": "m"}, "data": {"train": "t"}, "output": {"dir": str(tmp_path / "out")}})
    run = tmp_path / "out" / "train"
    backend = make_backend()
    for step, accuracy in [(2, 0.5), (4, 0.9), (6, 0.7)]:
        save_checkpoint(run / checkpoint_name(step, 0), backend=backend, rank=0, world_size=1, job={"name": "t"},
                        state={"train": {"step": step}, "metrics": {"step": step, "val_accuracy": accuracy}}, rank_state={})
    cut = save_checkpoint(run / checkpoint_name(8, 0), backend=backend, rank=0, world_size=1, job={"name": "t"},
                          state={"train": {"step": 8}, "metrics": {"step": 8, "val_accuracy": 0.99}}, rank_state={})
    (cut / "manifest-rank0.json").unlink()  # incomplete: never a candidate
    registered = [(ray.train.Checkpoint(str(run / checkpoint_name(s, 0))), {"val_accuracy": a}) for s, a in [(2, 0.5), (6, 0.7)]]
    extra = unregistered_checkpoints(spec, registered)
    assert [Path(c.path).name for c, _ in extra] == [checkpoint_name(4, 0)]  # written, complete, not in Ray's list
    best, metrics = pick_best(registered + extra, "val_accuracy", "max")
    assert Path(best.path).name == checkpoint_name(4, 0) and metrics["val_accuracy"] == 0.9
    # After the run: the cut-short folder goes (Ray's retention never sees it); the best and Ray's own stay.
    removed = remove_stale_checkpoints(spec, [c for c, _ in registered], best)
    assert [Path(f).name for f in removed] == [checkpoint_name(8, 0)]
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == [checkpoint_name(s, 0) for s in (2, 4, 6)]
    # Had a registered one been the best, the unregistered step-4 folder would go too.
    assert [Path(f).name for f in remove_stale_checkpoints(spec, [c for c, _ in registered], registered[1][0])] == [checkpoint_name(4, 0)]
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == [checkpoint_name(s, 0) for s in (2, 6)]
