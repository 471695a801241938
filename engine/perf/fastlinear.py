"""Frozen linear layers computed fast: FP8 matmuls for frozen weights, LoRA fused into the base GEMM.

A frozen weight never changes, so it is quantized **once** (rowwise-scaled float8 e4m3, one copy per
matmul orientation: forward ``x @ W^T`` and backward ``dy @ W``), and the bf16 copy is released. The
activations and gradients are quantized rowwise on the fly (one fused Triton pass on GPUs, plain torch
elsewhere), and ``torch._scaled_mm`` returns bf16. No weight gradient is ever computed for a frozen
weight, so the backward needs only the ``dy @ W`` matmul.

A LoRA adapter over a frozen base is computed in the same autograd function: ``y = base(x)`` then
``y += s * (x A^T) B^T`` as one ``addmm`` (the GEMM epilogue adds it), and in the backward the adapter's
input gradient is added into the base's with ``addmm_``; PEFT's separate matmul, scale and add passes
over the (tokens x out-features) tensor disappear. Trainable adapter weights stay fp32 (master weights);
their matmuls run in the compute dtype.

The module structure and parameter names are left as they are (PEFT's ``lora.Linear`` keeps its
``lora_A``/``lora_B``; only ``forward`` is replaced per instance), so checkpoints, export and merging are
unaffected. The LoRA side (which layers fuse, their forward) is in :mod:`engine.adapters.fused`, with
the rest of what knows PEFT; this module never imports ``peft``.
"""

from __future__ import annotations

import logging
import types
import weakref
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

E4M3_MAX = 448.0
TRITON_MAX_K = 16384


def _quantize_rowwise_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


_TRITON_KERNEL: Any = None


def _triton_kernel() -> Any:
    """The rowwise quantization kernel (compiled lazily; None when Triton is not importable)."""
    global _TRITON_KERNEL
    if _TRITON_KERNEL is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _TRITON_KERNEL = False
            return False

        @triton.jit
        def quantize_rows(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            offs = tl.arange(0, BLOCK)
            mask = offs < K
            x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
            scale = amax / 448.0
            q = tl.minimum(tl.maximum(x * (448.0 / amax), -448.0), 448.0)
            tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
            tl.store(s_ptr + row, scale)

        _TRITON_KERNEL = (triton, quantize_rows)
    return _TRITON_KERNEL


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (M, K) -> (``q`` float8 e4m3 (M, K), ``scale`` fp32 (M, 1)) with ``x ~= q * scale`` per row."""
    if not (x.is_cuda and x.shape[1] <= TRITON_MAX_K and _triton_kernel() and _triton_agrees(x)):
        return _quantize_rowwise_torch(x)
    return quantize_rowwise_triton(x)


_TRITON_CHECKED: dict[str, bool] = {}


def _triton_agrees(x: torch.Tensor) -> bool:
    """Check the Triton kernel against the torch path once per process on real data; fall back if it differs."""
    if "ok" not in _TRITON_CHECKED:
        sample = x[:64].detach()
        q0, s0 = _quantize_rowwise_torch(sample)
        try:
            q1, s1 = quantize_rowwise_triton(sample)
            ok = torch.allclose(s1, s0, rtol=1e-5) and bool((q1.float() - q0.float()).abs().le(q0.float().abs() * 0.126 + 0.02).all())
        except Exception as exc:  # a Triton that cannot compile here
            log.warning("Triton FP8 quantization failed (%s); using the torch path", exc)
            ok = False
        if not ok:
            log.warning("Triton FP8 quantization disagrees with the torch path; using the torch path")
        _TRITON_CHECKED["ok"] = ok
    return _TRITON_CHECKED["ok"]


def quantize_rowwise_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rowwise` as one Triton pass (one program per row: load, amax, scale, store)."""
    triton, quantize_rows = _triton_kernel()
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    quantize_rows[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return q, scale


_LAST_QUANTIZED: list[Any] = [None, -1, None]
"""(weak reference to the layer input, its version, (q, scale)): q, k and v projections (and gate and up)
read the same input tensor, which is then quantized once."""


def _cached_quantize(x: torch.Tensor, source: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if source is None:
        return quantize_rowwise(x)
    ref, version, cached = _LAST_QUANTIZED
    if ref is not None and ref() is source and version == source._version and cached[0].shape == x.shape:
        return cached
    out = quantize_rowwise(x)
    _LAST_QUANTIZED[:] = [weakref.ref(source), source._version, out]
    return out


def clear_quantize_cache() -> None:
    """Drop the cached quantized input (frees its memory)."""
    _LAST_QUANTIZED[:] = [None, -1, None]


class FrozenWeight:
    """A frozen (N, K) weight that multiplies activations: ``forward(x) = x @ W^T``, ``backward(g) = g @ W``."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        self.weight = weight.detach().to(dtype)
        self.shape = tuple(weight.shape)
        self.dtype = dtype

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this weight holds, by name (registered on the layer as non-persistent buffers)."""
        return {"weight": self.weight}

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        return x @ self.weight.t()

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        return grad @ self.weight


class Fp8FrozenWeight(FrozenWeight):
    """The weight quantized once to rowwise-scaled e4m3, in both orientations ``_scaled_mm`` needs."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        w = weight.detach()
        self.shape = tuple(w.shape)
        self.out_dtype = self.dtype = dtype
        self.q, scale = quantize_rowwise(w)  # (N, K): forward operand q.t() is (K, N) column-major
        self.scale = scale.reshape(1, -1).contiguous()  # (1, N)
        self.q_t, scale_t = quantize_rowwise(w.t().contiguous())  # (K, N): backward operand q_t.t() is (N, K) column-major
        self.scale_t = scale_t.reshape(1, -1).contiguous()  # (1, K)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Both orientations and their scales, by name (registered on the layer as non-persistent buffers)."""
        return {"q": self.q, "scale": self.scale, "q_t": self.q_t, "scale_t": self.scale_t}

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        xq, xs = _cached_quantize(x, source)
        return torch._scaled_mm(xq, self.q.t(), scale_a=xs, scale_b=self.scale, out_dtype=self.out_dtype)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        gq, gs = quantize_rowwise(grad)
        return torch._scaled_mm(gq, self.q_t.t(), scale_a=gs, scale_b=self.scale_t, out_dtype=self.out_dtype)


class FrozenLinearFn(torch.autograd.Function):
    """``y = x W^T (+ s * (x_l A^T) B^T) (+ bias)`` with a frozen ``W``; grads for x, A, B (never W, bias)."""

    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, frozen: FrozenWeight, scaling: float, bias, dtype):  # noqa: D102
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y = frozen.forward(x2, source=x)
        saved: list[torch.Tensor] = []
        if lora_a is not None:
            xl2 = x2 if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            h = xl2 @ a.t()
            y.addmm_(h, b.t(), alpha=scaling)
            saved = [xl2, h, a, b]
        if bias is not None:
            y += bias.to(dtype)
        ctx.save_for_backward(*saved)
        ctx.frozen, ctx.scaling, ctx.has_lora, ctx.separate_lora_input = frozen, scaling, lora_a is not None, x_lora is not None
        ctx.dtypes = (x.dtype, None if lora_a is None else lora_a.dtype, dtype)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        lead = grad_out.shape[:-1]
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtypes[2])
        need_x = ctx.needs_input_grad[0]
        dx = ctx.frozen.backward(g2) if need_x else None
        dx_lora = da = db = None
        if ctx.has_lora:
            xl2, h, a, b = ctx.saved_tensors
            g2 = g2.to(h.dtype)
            dh = (g2 @ b).mul_(ctx.scaling)
            db = (g2.t() @ h).mul_(ctx.scaling).to(ctx.dtypes[1])
            da = (dh.t() @ xl2).to(ctx.dtypes[1])
            if ctx.separate_lora_input:
                dx_lora = (dh @ a).view(*lead, a.shape[1])
            elif need_x:
                dx.addmm_(dh, a)
        if dx is not None:
            dx = dx.view(*lead, dx.shape[-1]).to(ctx.dtypes[0])
        return dx, dx_lora, da, db, None, None, None, None


def compute_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    """The autocast dtype when autocast is on for ``device_type``, else ``fallback``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return fallback


def _frozen_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(x.device.type, self._fast_frozen.dtype)
    return FrozenLinearFn.apply(x, None, None, None, self._fast_frozen, 1.0, self.bias, dtype)


BUFFER_PREFIX = "fast_frozen_"
"""Name prefix of the fast frozen copies' buffers on a layer (``fast_frozen_weight``, ``fast_frozen_q``, ...)."""


def freeze_to_fast(linear: nn.Linear, fp8: bool, dtype: torch.dtype) -> None:
    """Move a frozen ``nn.Linear``'s weight into a :class:`FrozenWeight` (FP8 or ``dtype``) and free the original.

    The copy's tensors are also the layer's non-persistent buffers (``fast_frozen_*``, the same tensors,
    no extra memory), so ``named_buffers`` (state digests, memory tools) sees them while ``state_dict``,
    checkpoints and exports do not. The forward reads them from the :class:`FrozenWeight`, not the buffers.
    """
    weight = linear.weight
    linear._fast_frozen = Fp8FrozenWeight(weight, dtype) if fp8 else FrozenWeight(weight, dtype)
    for name, tensor in linear._fast_frozen.tensors().items():
        linear.register_buffer(BUFFER_PREFIX + name, tensor, persistent=False)
    # The parameter keeps its name (state dicts, DDP) but no longer holds the matrix.
    linear.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=weight.device), requires_grad=False)
    linear.in_features, linear.out_features = linear._fast_frozen.shape[1], linear._fast_frozen.shape[0]


def fast_frozen_buffer_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s fast frozen copies among its buffers (for DDP to leave alone: they are the
    same on every rank, made from the same pre-trained weights, and must not be broadcast each step)."""
    return [name for name, _ in model.named_buffers() if name.rpartition(".")[2].startswith(BUFFER_PREFIX)]


def fp8_supported(k: int, n: int) -> bool:
    """``_scaled_mm`` needs both weight dimensions divisible by 16."""
    return k % 16 == 0 and n % 16 == 0


def freeze_linears_to_fast(model: nn.Module, *, fp8: bool, dtype: torch.dtype, skip: tuple[nn.Module, ...] = ()) -> dict[str, int]:
    """Route every frozen linear layer of ``model`` through :class:`FrozenLinearFn` (its weight in a
    :class:`FrozenWeight`: FP8 or ``dtype``). Linear layers inside adapters (``lora_*``), trainable ones
    and those with a trainable bias are left alone; a LoRA layer over a frozen base may then fuse its
    adapter into the base GEMM (:func:`engine.adapters.fused.fuse_lora_layers`).

    Args:
        model: the prepared model (PEFT-wrapped or plain), already on its device.
        fp8: quantize frozen weights to FP8 (where both dimensions are multiples of 16).
        dtype: the compute dtype frozen weights are stored in when not FP8.
        skip: modules left alone (the output embeddings, whose weight fused cross-entropy kernels read).

    Returns:
        Counts of ``fp8`` and ``dense`` (``dtype``) frozen weights.
    """
    counts = {"fp8": 0, "dense": 0}
    skip_ids = {id(m) for m in skip}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or id(module) in skip_ids or module.weight.requires_grad:
            continue
        if module.bias is not None and module.bias.requires_grad:
            continue
        if any(part.startswith("lora_") for part in name.split(".")):
            continue
        use_fp8 = fp8 and fp8_supported(module.in_features, module.out_features)
        freeze_to_fast(module, use_fp8, dtype)
        counts["fp8" if use_fp8 else "dense"] += 1
        module.forward = types.MethodType(_frozen_linear_forward, module)
    return counts
