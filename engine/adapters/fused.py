"""The fused LoRA path: a plain LoRA layer over a fast frozen base (:mod:`engine.perf.fastlinear`) computes
``y = x W^T + s * (x A^T) B^T`` in one autograd function, the adapter added in the base GEMM's epilogue.

Only ``forward`` is replaced, per instance; the layer keeps PEFT's ``lora_A`` / ``lora_B`` and its
parameter names, so checkpoints, export and merging are unaffected. DoRA, several adapters on one layer,
a disabled or merged adapter, or extra forward arguments keep PEFT's own forward.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

from engine.perf.fastlinear import FrozenLinearFn, compute_dtype

log = logging.getLogger(__name__)


def is_plain_lora_linear(module: nn.Module) -> bool:
    """Whether ``module`` is PEFT's LoRA ``Linear`` with one adapter, no DoRA, over a plain ``nn.Linear``."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    if not isinstance(module, LoraLinear) or type(module.get_base_layer()) is not nn.Linear:
        return False
    return not any(module.use_dora.values()) and len(module.lora_A) == 1


def fused_lora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward a fused LoRA layer gets (``self`` is the PEFT layer); PEFT's own where fusing does not apply."""
    if self.disable_adapters or self.merged or len(self.active_adapters) != 1 or args or kwargs:
        return self._unfused_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A:
        return self._unfused_forward(x, *args, **kwargs)
    base = self.get_base_layer()
    frozen = base._fast_frozen
    dropout = self.lora_dropout[name]
    x_lora = None if isinstance(dropout, nn.Identity) or not self.training else dropout(x)
    dtype = compute_dtype(x.device.type, frozen.dtype)
    y = FrozenLinearFn.apply(
        x, x_lora, self.lora_A[name].weight, self.lora_B[name].weight, frozen, float(self.scaling[name]), base.bias, dtype
    )
    return y


def fuse_lora_layers(model: nn.Module) -> int:
    """Give every plain LoRA layer whose base is already a fast frozen linear the fused forward; returns
    how many were fused (call after :func:`engine.perf.fastlinear.freeze_linears_to_fast`)."""
    fused = 0
    for module in model.modules():
        if is_plain_lora_linear(module) and getattr(module.get_base_layer(), "_fast_frozen", None) is not None:
            module._unfused_forward = module.forward
            module.forward = types.MethodType(fused_lora_forward, module)
            fused += 1
    return fused
