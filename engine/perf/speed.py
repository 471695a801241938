"""Speed features applied to a prepared model, and the throughput meter every report carries.

:func:`apply_perf` runs in the worker after ``prepare_model`` (load -> head -> freeze -> adapters) and
before the optimizer is built; it never changes parameter names or which parameters train, so
checkpoints, export and the LR groups are the same with and without it. Each feature is a
``perf.*`` job setting; one that does not apply is skipped with a log line.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.adapters.fused import fuse_lora_layers
from engine.perf.fastlinear import freeze_linears_to_fast
from engine.tasks import get_task

log = logging.getLogger(__name__)

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}
"""Dense bf16 datasheet peaks (TFLOP/s) by GPU name fragment, for MFU."""


@dataclass
class PerfPlan:
    """What :func:`apply_perf` turned on (logged, and put in the benchmark JSON)."""

    liger: bool = False
    fp8: bool = False
    fused_lora: int = 0
    fp8_layers: int = 0
    compiled: int = 0
    """Blocks compiled (regional compilation); 0 when ``perf.compile`` is off."""
    cudnn_benchmark: bool = False
    activation_checkpointing: bool = False
    frozen_dtype: str | None = None
    notes: list[str] = field(default_factory=list)


def base_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def fp8_available(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def cast_for_mixed_precision(model: nn.Module, amp_dtype: torch.dtype | None) -> str | None:
    """Trainable floating parameters -> fp32 (master weights); frozen ones -> ``amp_dtype`` (no per-step casts)."""
    for param in model.parameters():
        if not param.is_floating_point():
            continue
        if param.requires_grad:
            param.data = param.data.float()
        elif amp_dtype is not None:
            param.data = param.data.to(amp_dtype)
    return str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else None


def apply_liger(model: nn.Module) -> str | None:
    """Patch the model instance with Liger kernels; returns why not, or None when applied."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return "liger-kernel is not installed (pip install liger-kernel)"
    model_type = getattr(getattr(base_model(model), "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # Liger would return silently without patching anything
        return f"Liger has no kernels for model type {model_type!r}"
    try:
        _apply_liger_kernel_to_instance(model=base_model(model))
    except Exception as exc:  # Liger raises on architectures it does not know
        return f"Liger does not support this model: {exc}"
    return None


def apply_perf(
    model: nn.Module, perf: Any, task: str, device: torch.device, amp_dtype: torch.dtype | None, keep_frozen_weights: bool = False
) -> PerfPlan:
    """Apply the job's ``perf`` settings to ``model`` (in place) on ``device``.

    ``keep_frozen_weights`` (gradual unfreezing will train them later, or ZeRO-3 partitions them) leaves
    frozen weights as they are: fp32, no FP8 copy, no fused LoRA.
    """
    plan = PerfPlan()
    inner = base_model(model)
    if get_task(task).next_token_loss and hasattr(inner, "config"):
        inner.config.use_cache = False  # training needs no KV cache; packing needs none either
    if perf.frozen_weights_in_compute_dtype and keep_frozen_weights:
        plan.notes.append("frozen weights stay fp32: gradual unfreezing trains them later (they need fp32 master weights)")
    elif perf.frozen_weights_in_compute_dtype:
        plan.frozen_dtype = cast_for_mixed_precision(model, amp_dtype)
    if perf.liger_kernels:
        if device.type != "cuda":
            plan.notes.append("Liger kernels skipped: they need a GPU")
        elif (why := apply_liger(model)) is not None:
            plan.notes.append(f"Liger kernels skipped: {why}")
        else:
            plan.liger = True
    fp8 = perf.fp8_frozen == "on" or (perf.fp8_frozen == "auto" and fp8_available(device) and amp_dtype == torch.bfloat16)
    if keep_frozen_weights and (fp8 or perf.fused_lora):
        plan.notes.append("FP8 / fused LoRA skipped: gradual unfreezing trains the frozen weights later")
    elif fp8 or perf.fused_lora:
        out_embeddings = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        dtype = amp_dtype or next(model.parameters()).dtype
        counts = accelerate_frozen_linears(
            model, fp8=fp8, fuse_lora=perf.fused_lora, dtype=dtype, skip=(out_embeddings,) if out_embeddings is not None else ()
        )
        plan.fp8, plan.fp8_layers, plan.fused_lora = fp8 and counts["fp8"] > 0, counts["fp8"], counts["fused_lora"]
    if perf.activation_checkpointing:
        if getattr(inner, "supports_gradient_checkpointing", False):
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            plan.activation_checkpointing = True
        else:
            plan.notes.append(f"activation checkpointing skipped: {type(inner).__name__} does not support it")
    if perf.compile:
        plan.compiled = compile_blocks(model)
    if device.type == "cuda" and (perf.cudnn_benchmark == "on" or (perf.cudnn_benchmark == "auto" and fixed_input_shape(inner))):
        torch.backends.cudnn.benchmark = plan.cudnn_benchmark = True
    for note in plan.notes:
        log.info(note)
    log.info("perf: %s", {k: v for k, v in plan.__dict__.items() if k != "notes"})
    return plan


def accelerate_frozen_linears(
    model: nn.Module, *, fp8: bool, fuse_lora: bool, dtype: torch.dtype, skip: tuple[nn.Module, ...] = ()
) -> dict[str, int]:
    """Frozen linear layers through the fast path (:func:`engine.perf.fastlinear.freeze_linears_to_fast`: FP8
    where ``fp8`` and the shapes allow, else ``dtype``), then, with ``fuse_lora``, plain LoRA layers over
    them fused into the base GEMM (:func:`engine.adapters.fused.fuse_lora_layers`; DoRA and multi-adapter
    layers keep PEFT's forward). ``skip``: modules left alone (the output embeddings).

    Returns:
        Counts of ``fp8`` and ``dense`` frozen weights and ``fused_lora`` layers.
    """
    counts = {**freeze_linears_to_fast(model, fp8=fp8, dtype=dtype, skip=skip), "fused_lora": 0}
    if fuse_lora:
        counts["fused_lora"] = fuse_lora_layers(model)
    log.info("fast frozen linears: %d fp8, %d %s, %d LoRA layers fused", counts["fp8"], counts["dense"], dtype, counts["fused_lora"])
    return counts


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (transformer layers, conv feature layers), outermost only.

    ``transformers`` marks them as ``GradientCheckpointingLayer``; for other models, the children of every
    ``nn.ModuleList`` whose children all share one class.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers is a dependency
        GradientCheckpointingLayer = ()  # type: ignore[assignment]  # noqa: N806
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        if GradientCheckpointingLayer and isinstance(module, GradientCheckpointingLayer):
            found.append((name, module))
    if not found:
        for name, module in model.named_modules():
            children = list(module.children()) if isinstance(module, nn.ModuleList) else []
            if len(children) > 1 and len({type(c) for c in children}) == 1 and not any(name.startswith(o + ".") for o, _ in found):
                found.extend((f"{name}.{i}", c) for i, c in enumerate(children))
    return [module for _, module in found]


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each repeated block in place (regional compilation, as torchtitan does per block):
    identical blocks share one compiled graph, so compiling takes seconds instead of minutes, graph breaks
    in the model's top-level code (masks, loss, generation glue) stay out of the graphs, and parameter names
    do not change. Falls back to the whole model when it has no repeated blocks. Returns the blocks compiled."""
    blocks = repeated_blocks(model)
    for block in blocks or [model]:
        block.compile()
    log.info("torch.compile: %d repeated blocks compiled in place", len(blocks))
    return len(blocks) or 1


def fixed_input_shape(model: nn.Module) -> bool:
    """Whether every batch has the same input shape, so cuDNN's autotuning is paid once: Whisper's encoder
    always takes 30 s windows (3,000 log-mel frames)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "whisper"


# ---------------------------------------------------------------------------------------------------
# Throughput: tokens/s, MFU and peak memory, measured without a host sync inside the step.


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) weights of the linear layers that multiply every token, adapters excluded.

    The output projection (``lm_head``) counts, embeddings do not: the convention of
    ``shared/bench/peer_baseline.py`` (N counts the lm_head matmul).
    """
    total = trainable = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(part.startswith("lora_") for part in name.split(".")):
            continue
        frozen = getattr(module, "_fast_frozen", None)
        n = frozen.shape[0] * frozen.shape[1] if frozen is not None else module.weight.numel()
        total += n
        if frozen is None and module.weight.requires_grad:
            trainable += n
    return total, trainable


def flops_per_token(n_params: int, n_trainable: int, layers: int, hidden: int, seq: int) -> float:
    """Training FLOPs per token: 2N forward + 2N input-gradient + 2N_trainable weight-gradient, plus
    attention ``12 * L * d * seq`` (PaLM convention; for frozen-base LoRA this is the peer's ``4N + 12Lds``)."""
    return 4 * n_params + 2 * n_trainable + 12 * layers * hidden * seq


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Dense bf16 peak FLOP/s of one device (the job's value, else the table), or None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


SPEECH_INPUTS = ("input_features", "input_values")


def speech_input(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A speech batch's model input (log-mel features or raw audio), or None for text."""
    return next((batch[k] for k in SPEECH_INPUTS if k in batch), None)


def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens the model computes on: the attention mask's sum, or every position of packed rows (whose
    only padding is the short tail of a row). Stays on the device (no host sync)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)


def training_flops(model: nn.Module, batch: dict[str, torch.Tensor], amp_dtype: torch.dtype | None) -> float:
    """FLOPs of one training micro-batch (forward and backward), counted op by op by torch's
    ``FlopCounterMode`` (matmuls, convolutions, attention) on ``batch``.

    It runs on detached views of the parameters, so the model's gradients, DDP's hooks and the RNG state
    are untouched, and compiled blocks run eagerly for the count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = {name: p.detach().requires_grad_(p.requires_grad) for name, p in model.named_parameters()}
    device = next(iter(batch.values())).device
    if amp_dtype is None:  # the model casts itself (DeepSpeed bf16, bf16 weights): inputs in its dtype
        dtype = next((p.dtype for p in params.values() if p.is_floating_point()), torch.float32)
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eager, FlopCounterMode(display=False) as counter:
        with autocast:
            loss = torch.func.functional_call(model, params, args=(), kwargs=batch).loss
        loss.backward()
    return float(counter.get_total_flops())


class ThroughputMeter:
    """Counts samples, tokens and FLOPs over a window of steps; reads the clock only at window ends.

    Text FLOPs come from the formula of :func:`flops_per_token` and the batch's real tokens. Speech models
    have no such formula (convolutions, encoder frames and decoder tokens): their FLOPs are counted once
    with :func:`training_flops` on one row of the first batch and scaled by each batch's rows and input length.
    """

    def __init__(self, model: nn.Module, device: torch.device, world_size: int, peak_tflops: float | None = None,
                 amp_dtype: torch.dtype | None = None):
        self.model, self.amp_dtype = model, amp_dtype
        self.flops_per_input: float | None = None  # speech: counted FLOPs per input element (per sample x length)
        inner = base_model(getattr(model, "module", model))
        cfg = getattr(inner, "config", None)
        self.layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
        self.hidden = int(getattr(cfg, "hidden_size", 0) or 0)
        self.n_params, self.n_trainable = matmul_params(inner)
        self.device, self.world_size = device, world_size
        self.peak = peak_flops(device, peak_tflops)
        if device.type == "cuda":  # peak memory of training, not of building the model
            torch.cuda.reset_peak_memory_stats(device)
        self.reset()

    def reset(self) -> None:
        """Start a new window (synchronizes once so queued work is not counted in it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.start = time.perf_counter()
        self.samples = 0
        self.attention_flops = 0.0
        self.counted_flops = 0.0
        self.tokens = torch.zeros((), device=self.device, dtype=torch.int64)

    def add(self, batch: dict[str, torch.Tensor], tokens: torch.Tensor | None = None, samples: int | None = None) -> None:
        """Count one micro-batch: ``tokens`` (a device tensor; default :func:`count_tokens`) and ``samples``
        (default: its rows). Only shapes are read on the host, so nothing waits for the device."""
        ids = batch.get("input_ids")
        rows, width = (ids.shape[0], ids.shape[1]) if ids is not None and ids.ndim == 2 else (1, 0)
        self.samples += samples if samples is not None else rows
        if tokens is None and ids is not None:
            tokens = count_tokens(batch)
        if tokens is not None:
            self.tokens += tokens
        self.attention_flops += 12 * self.layers * self.hidden * width * rows * width
        if ids is None and (inputs := speech_input(batch)) is not None:
            self.counted_flops += self.speech_flops(batch, inputs)

    def speech_flops(self, batch: dict[str, torch.Tensor], inputs: torch.Tensor) -> float:
        """FLOPs of a speech micro-batch: counted on one row of the first batch, then per input element."""
        if self.flops_per_input is None and any(hasattr(p, "ds_id") for p in self.model.parameters()):
            log.info("MFU is left out: DeepSpeed ZeRO-3 partitions the parameters the FLOP count would run on")
            self.flops_per_input = 0.0
        if self.flops_per_input is None:
            one_row = {k: v[:1] for k, v in batch.items() if torch.is_tensor(v) and v.ndim >= 1}
            try:
                self.flops_per_input = training_flops(self.model, one_row, self.amp_dtype) / inputs[:1].numel()
            except Exception as exc:  # an architecture the count cannot run: no MFU rather than a failed run
                log.warning("could not count the speech model's FLOPs (%s): MFU is left out", exc)
                self.flops_per_input = 0.0
        return self.flops_per_input * inputs.numel()

    def read(self) -> dict[str, float]:
        """Metrics of the window so far: samples/s, tokens/s, MFU (%) and peak memory (GiB), all workers."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens = int(self.tokens.item())
        out = {
            "samples_per_s": self.samples * self.world_size / elapsed,
            "tokens_per_s": tokens * self.world_size / elapsed,
            "window_s": elapsed,
        }
        if self.flops_per_input is None:  # text: the formula
            flops = tokens * (4 * self.n_params + 2 * self.n_trainable) + self.attention_flops
        else:  # speech: counted (0 when counting failed)
            flops = self.counted_flops
        if self.peak and flops:
            out["mfu_pct"] = 100.0 * flops / elapsed / self.peak
        out["tflops_per_s_per_device"] = flops / elapsed / 1e12
        if self.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out
