"""DeepSpeed ZeRO 0-3: the only module that imports ``deepspeed``.

The engine's torch AdamW over the LR-ratio parameter groups is handed to ``deepspeed.initialize`` (with
``zero_allow_untested_optimizer``), so frozen parameters never enter the optimizer and every group keeps
its own LR; DeepSpeed's own optimizers would need compiled ops. Batch sizes, accumulation, clipping, ZeRO
stage, offload and precision come from the job (:mod:`engine.backends.ds_config`).

Design against known upstream traps:
- frozen weights lost on ZeRO-3 resume (DeepSpeed #3090): frozen weights are never taken from a
  DeepSpeed checkpoint (``exclude_frozen_parameters``); every (re)start rebuilds them from the
  pre-trained model, so they are bit-identical to it.
- ZeRO-2 with frozen layers (#4055): only trainable parameters are in the optimizer groups.
- ZeRO-3 partitions every parameter: trainable weights are gathered as full fp32 tensors
  (``safe_get_full_fp32_param``) before saving, so checkpoints and exports hold real, full-size tensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.backends.ds_config import build_ds_config
from engine.checkpoints.store import trained_buffers
from engine.config.schema import JobSpec
from engine.loop.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)
DS_DIR = "deepspeed"
DS_TAG = "state"


def _import_deepspeed() -> Any:
    """Import deepspeed for the worker's device, without JIT-compiling its shared-memory allreduce on CPU.

    On the CPU accelerator ``deepspeed.comm`` builds a shared-memory op on first use (~70 s of C++
    compilation); gloo's allreduce is used instead unless ``SHOULDERS_DS_SHM_COMM=1``.
    ``TORCH_EXTENSIONS_DIR`` defaults to a cache so any op that does compile is compiled once.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/shoulders/torch_extensions"))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch as ds_torch_comm

    if os.environ.get("DS_ACCELERATOR") == "cpu" and os.environ.get("SHOULDERS_DS_SHM_COMM") != "1":
        ds_torch_comm.build_shm_op = lambda: None
    return deepspeed


class DeepSpeedBackend:
    """A DeepSpeed engine around the model: ``engine.backward`` / ``engine.step`` handle accumulation,
    clipping, loss scaling and the LR schedule; checkpoints are DeepSpeed's own per-rank files."""

    def __init__(
        self, job: JobSpec, model: nn.Module, groups: list[dict[str, Any]], total_steps: int, warmup_steps: int,
        device: torch.device, world_size: int,
    ) -> None:
        deepspeed = _import_deepspeed()
        self._deepspeed = deepspeed
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.config = build_ds_config(job, world_size, bf16_supported=bf16)
        self.stage = self.config["zero_optimization"]["stage"]
        offload = self.config["zero_optimization"]["offload_optimizer"]["device"] != "none"
        # Offloaded optimizer state lives on the CPU: a plain (not fused) AdamW steps it there.
        optimizer = build_optimizer(groups, job.optim.betas, torch.device("cpu") if offload else device)
        scheduler = build_scheduler(optimizer, total_steps, warmup_steps, job.optim.schedule)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config, dist_init_required=False,
        )
        self.module = self.engine.module
        self.model = self.engine
        self.amp_dtype = None  # DeepSpeed casts the model itself (bf16/fp16 sections)
        log.info("DeepSpeed ZeRO-%d on %d worker(s), offload optimizer %s", self.stage, world_size, offload)

    def rewrap(self) -> None:
        raise NotImplementedError("gradual unfreezing is not supported with backend.name 'deepspeed'")

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def gathered(self) -> Any:
        if self.stage < 3:
            return contextlib.nullcontext()
        return self._deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.engine(**batch)

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> Any:
        outputs = self.engine(**batch)
        self.engine.backward(outputs.loss)
        return outputs

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def group_lrs(self) -> dict[str, float]:
        """The LRs in the optimizer DeepSpeed steps (the ZeRO wrapper's groups are the AdamW's groups)."""
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.module.named_parameters():
            if not param.requires_grad:
                continue
            full = safe_get_full_fp32_param(param)  # a collective under ZeRO-3
            if full is None:  # ZeRO-0 without a mixed-precision wrapper: the parameter is the master weight
                full = param
            out[name] = full.detach().float().to("cpu").contiguous().clone()
        return {**out, **trained_buffers(self.module)}

    def save(self, folder: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(folder / DS_DIR), tag=DS_TAG, client_state={}, save_latest=False, exclude_frozen_parameters=True)

    def load(self, folder: Path) -> None:
        # DeepSpeed's own per-rank files (optimizer partitions, schedule, trainable module weights) are read
        # with DeepSpeed's loader; frozen weights stay the pre-trained ones the worker just loaded.
        path, _ = self.engine.load_checkpoint(
            str(folder / DS_DIR), tag=DS_TAG, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if path is None:
            raise ValueError(f"DeepSpeed found no checkpoint under '{folder / DS_DIR}'")
