"""Trainable weights in the compute dtype, with fp32 master weights in the optimizer.

Autocast keeps every trainable weight in fp32 and re-casts it to bf16 on every use, and it runs
LayerNorm, softmax and the residual additions around them in fp32, so the activations of the residual
stream travel in fp32. For a full fine-tune (every weight trains, nothing is frozen) that is most of the
memory traffic of the step. This is the other standard recipe (Megatron's mixed precision, torchtitan's
FSDP ``param_dtype=bf16``): the model's trainable weights are bf16 and the model runs without autocast,
entirely in bf16; the optimizer steps fp32 *master* copies, gradients are added into fp32 gradient
buffers after each micro-batch, and after each optimizer step the masters are copied back into the
bf16 weights. The output layer's logits are upcast to fp32 so the loss is computed in fp32.

Checkpoints hold the fp32 masters under the model's parameter names, so resume is exact and a checkpoint
does not depend on which recipe wrote it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MasterWeights:
    """fp32 masters of a model's trainable weights, which are turned into ``dtype`` in place.

    ``groups`` are the optimizer's parameter groups over the model's (fp32) trainable parameters;
    :attr:`groups` are the same groups over the masters, for the optimizer.
    """

    def __init__(self, module: nn.Module, groups: list[dict[str, Any]], dtype: torch.dtype) -> None:
        names = {id(p): n for n, p in module.named_parameters()}
        self.dtype = dtype
        self.params: list[nn.Parameter] = []
        self.masters: list[nn.Parameter] = []
        self.names: list[str] = []
        self.groups = []
        for group in groups:
            masters = []
            for param in group["params"]:
                master = nn.Parameter(param.detach().float().clone())
                param.data = param.data.to(dtype)
                self.params.append(param)
                self.masters.append(master)
                self.names.append(names[id(param)])
                masters.append(master)
            self.groups.append({**group, "params": masters})
        self.by_name = dict(zip(self.names, self.masters))
        for param in module.parameters():  # frozen weights too: a bf16 model has no fp32 weight to promote to
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)

    def accumulate_grads(self) -> None:
        """Add the model's (bf16) gradients into the masters' fp32 gradients and free them."""
        for param, master in zip(self.params, self.masters):
            if param.grad is None:
                continue
            if master.grad is None:
                master.grad = param.grad.float()
            else:
                master.grad.add_(param.grad)
            param.grad = None

    @torch.no_grad()
    def all_reduce_grads(self, world_size: int) -> None:
        """Average the masters' fp32 gradients over the workers (one flat fp32 all-reduce; a missing
        gradient counts as zeros, so every rank sends the same buffer)."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [m.grad if m.grad is not None else torch.zeros_like(m) for m in self.masters]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat.div_(world_size)
        for master, reduced in zip(self.masters, _unflatten_dense_tensors(flat, grads)):
            master.grad = reduced

    @torch.no_grad()
    def publish(self) -> None:
        """Copy the masters into the model's weights (after an optimizer step or a load)."""
        torch._foreach_copy_(self.params, self.masters)

    def state(self) -> dict[str, torch.Tensor]:
        """The fp32 masters by parameter name, on CPU."""
        return {name: master.detach().to("cpu").contiguous() for name, master in self.by_name.items()}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the masters from saved fp32 weights (names as in the model), then the model's weights."""
        for name, tensor in tensors.items():
            if name in self.by_name:
                self.by_name[name].copy_(tensor)
        self.publish()


def upcast_logits(model: nn.Module) -> bool:
    """Make the model's output layer return fp32, so a loss computed from bf16 logits is computed in fp32
    (transformers' Whisper and classification heads apply cross-entropy to the logits as they come).
    Returns whether an output layer was found."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        for name in ("classifier", "score", "lm_head", "proj_out"):
            head = getattr(inner, name, None)
            if isinstance(head, nn.Module):
                break
            head = None
    if head is None:
        return False
    head.register_forward_hook(lambda _module, _inputs, output: output.float() if torch.is_tensor(output) else output)
    return True


def cast_batch(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating inputs (audio features, waveforms) in the model's dtype; ids and masks as they are."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
