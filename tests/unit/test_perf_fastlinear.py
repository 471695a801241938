"""FP8 frozen matmuls and fused LoRA: same function as the modules they replace, same trainable set."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.perf.fastlinear import Fp8FrozenWeight, quantize_rowwise
from engine.perf.speed import accelerate_frozen_linears


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_quantize_rowwise_roundtrip_and_scale_per_row():
    x = torch.randn(64, 48) * torch.logspace(-3, 3, 64).unsqueeze(1)  # rows of very different magnitude
    q, scale = quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert rel_err(q.float() * scale, x) < 0.05
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((64,), 448.0))


def test_fp8_frozen_weight_forward_and_input_gradient_match_dense():
    torch.manual_seed(0)
    w, x, g = torch.randn(96, 64), torch.randn(40, 64), torch.randn(40, 96)
    fp8 = Fp8FrozenWeight(w, torch.bfloat16)
    assert rel_err(fp8.forward(x), x @ w.t()) < 0.08
    assert rel_err(fp8.backward(g), g @ w) < 0.08
    assert fp8.forward(x).dtype == torch.bfloat16


def lora_mlp(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32), nn.Linear(32, 16, bias=False))
    base.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_dropout=0.0))
    for name, p in model.named_parameters():  # non-zero B so the adapter contributes
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)
    return model


def run(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad.clone(), grads


def test_fused_lora_equals_peft_exactly_in_fp32():
    model = lora_mlp()
    fused = copy.deepcopy(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    counts = accelerate_frozen_linears(fused, fp8=False, fuse_lora=True, dtype=torch.float32)
    assert counts == {"fp8": 0, "dense": 3, "fused_lora": 2}
    assert sorted(n for n, p in fused.named_parameters() if p.requires_grad) == trainable
    x = torch.randn(5, 7, 32)
    y0, dx0, g0 = run(model, x)
    y1, dx1, g1 = run(fused, x)
    assert torch.allclose(y1, y0, atol=1e-5)
    assert torch.allclose(dx1, dx0, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == 4
    for name in g0:
        assert torch.allclose(g1[name], g0[name], atol=1e-5), name


def test_fp8_lora_close_to_peft_and_frozen_weights_released():
    model = lora_mlp()
    fast = copy.deepcopy(model)
    counts = accelerate_frozen_linears(fast, fp8=True, fuse_lora=True, dtype=torch.bfloat16)
    assert counts["fp8"] == 3 and counts["fused_lora"] == 2
    frozen_elems = sum(p.numel() for n, p in fast.named_parameters() if not p.requires_grad and "weight" in n and p.ndim)
    assert frozen_elems == 0  # the dense copies are gone; only the FP8 copies remain
    x = torch.randn(4, 9, 32)
    y0, dx0, g0 = run(model, x)
    y1, dx1, g1 = run(fast, x)
    assert y1.dtype == torch.bfloat16 and not torch.isnan(y1).any()
    assert rel_err(y1, y0) < 0.1 and rel_err(dx1, dx0) < 0.1
    for name in g0:
        assert g1[name].dtype == torch.float32  # master weights stay fp32
        assert rel_err(g1[name], g0[name]) < 0.1, name


def test_output_embeddings_and_trainable_linears_are_left_alone():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 32))
    model[0].requires_grad_(False)
    model[1].requires_grad_(True)
    counts = accelerate_frozen_linears(model, fp8=True, fuse_lora=True, dtype=torch.bfloat16)
    assert counts["fp8"] == 1 and model[1].weight.shape == (32, 16)
    skipped = nn.Sequential(nn.Linear(16, 16)).requires_grad_(False)
    assert accelerate_frozen_linears(skipped, fp8=True, fuse_lora=False, dtype=torch.bfloat16, skip=(skipped[0],))["fp8"] == 0


def test_odd_shapes_fall_back_to_dense():
    model = nn.Sequential(nn.Linear(20, 24)).requires_grad_(False)
    assert accelerate_frozen_linears(model, fp8=True, fuse_lora=False, dtype=torch.float32) == {"fp8": 0, "dense": 1, "fused_lora": 0}
    x = torch.randn(3, 20)
    assert model(x).shape == (3, 24)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_with_dropout_trains(dropout):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(16, 16)).requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], lora_dropout=dropout))
    accelerate_frozen_linears(model, fp8=False, fuse_lora=True, dtype=torch.float32)
    model.train()
    model(torch.randn(4, 16)).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and grads[0] is not None and grads[0].abs().sum() == 0  # B starts at zero: no signal to A yet
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


TRITON_CHECK = """
import torch
from engine.perf.fastlinear import _quantize_rowwise_torch, quantize_rowwise_triton
x = (torch.randn(33, 2000) * 5).to(torch.bfloat16)
q1, s1 = quantize_rowwise_triton(x)
q0, s0 = _quantize_rowwise_torch(x)
assert q1.shape == q0.shape and q1.dtype == torch.float8_e4m3fn
assert torch.allclose(s1, s0)
# The interpreter's float8 conversion rounds a few values near a power of two differently from the GPU.
assert (q1.float() == q0.float()).float().mean() > 0.95
print("ok")
"""


def test_triton_quantize_kernel_matches_torch_under_the_interpreter():
    """Runs where Triton is installed (GPU images); its interpreter executes the kernel on the CPU (in a
    fresh process: the interpreter must be switched on before Triton is first imported)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("fp8", [False, True])
def test_fast_frozen_copies_are_non_persistent_buffers_outside_the_state_dict(fp8, tmp_path):
    from engine.backends.ddp import ignore_fast_frozen_buffers
    from engine.perf.fastlinear import fast_frozen_buffer_names

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16))
    model[0].requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = accelerate_frozen_linears(model, fp8=fp8, fuse_lora=False, dtype=torch.bfloat16)
    assert counts["fp8" if fp8 else "dense"] == 1
    # The copies are the layer's buffers (the same tensors), and nothing a checkpoint or export reads changed.
    buffers = dict(model.named_buffers())
    expected = ["0.fast_frozen_q", "0.fast_frozen_scale", "0.fast_frozen_q_t", "0.fast_frozen_scale_t"] if fp8 else ["0.fast_frozen_weight"]
    assert sorted(buffers) == sorted(expected) and fast_frozen_buffer_names(model) == expected
    for name, tensor in model[0]._fast_frozen.tensors().items():
        assert buffers[f"0.fast_frozen_{name}"] is tensor
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before if not k.startswith("0.weight"))
    # DDP leaves them alone (no broadcast at each forward).
    ignore_fast_frozen_buffers(model)
    assert sorted(model._ddp_params_and_buffers_to_ignore) == sorted(expected)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert not set(ddp.named_module_buffers) & set(expected)
    finally:
        dist.destroy_process_group()
