"""apply_perf: each perf setting does what it says on a tiny LoRA Llama, and never changes the trainable set."""

from __future__ import annotations

import pytest
import torch

from engine.config.sections import PerfSpec
from engine.perf.speed import apply_perf


def lora_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_defaults_on_cpu_fuse_lora_skip_liger_and_fp8_and_keep_the_trainable_set():
    model = lora_llama()
    before = trainable(model)
    plan = apply_perf(model, PerfSpec(), "causal_lm", torch.device("cpu"), None)
    assert not plan.liger and any("Liger" in note for note in plan.notes)
    assert not plan.fp8 and plan.fused_lora == 14  # 7 projections x 2 blocks
    assert trainable(model) == before
    assert model.get_base_model().config.use_cache is False
    ids = torch.randint(0, 64, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_fp8_on_quantizes_frozen_projections_but_not_the_output_embeddings():
    model = lora_llama()
    plan = apply_perf(model, PerfSpec(fp8_frozen="on"), "causal_lm", torch.device("cpu"), torch.bfloat16)
    assert plan.fp8 and plan.fp8_layers == 14 and plan.frozen_dtype == "bfloat16"
    assert model.get_base_model().lm_head.weight.shape == (64, 32)  # read by fused cross-entropy kernels: kept
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = torch.randint(0, 64, (2, 8))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_gradual_unfreezing_keeps_frozen_weights_dense():
    model = lora_llama()
    plan = apply_perf(model, PerfSpec(fp8_frozen="on"), "causal_lm", torch.device("cpu"), torch.bfloat16, keep_frozen_weights=True)
    assert plan.fp8_layers == 0 and plan.fused_lora == 0 and any("unfreezing" in n for n in plan.notes)
    # fp32 too: once unfrozen they train, and a bf16 weight stepped directly loses small updates
    assert plan.frozen_dtype is None and {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("setting", ["activation_checkpointing", "compile"])
def test_checkpointing_and_compile_are_applied(setting):
    model = lora_llama()
    plan = apply_perf(model, PerfSpec(fused_lora=False, **{setting: True}), "causal_lm", torch.device("cpu"), None)
    if setting == "activation_checkpointing":
        assert plan.activation_checkpointing and model.get_base_model().is_gradient_checkpointing
    else:  # regional: each decoder layer in place, not the model (names and the trainable set unchanged)
        layers = model.get_base_model().model.layers
        assert plan.compiled == 2 and all(layer._compiled_call_impl is not None for layer in layers)
        assert model._compiled_call_impl is None and not any("_orig_mod" in n for n, _ in model.named_parameters())
        ids = torch.randint(0, 64, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_repeated_blocks_outermost_only_and_plain_module_lists():
    from torch import nn

    from engine.perf.speed import repeated_blocks

    model = lora_llama()
    assert repeated_blocks(model) == list(model.get_base_model().model.layers)
    stack = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)]))
    assert repeated_blocks(stack) == list(stack[1])  # no transformers layers: the children of a uniform ModuleList
    assert repeated_blocks(nn.Sequential(nn.Linear(4, 4))) == []


def test_liger_reports_architectures_it_does_not_patch(monkeypatch):
    import sys
    import types

    from transformers import BertConfig, BertForSequenceClassification

    from engine.perf.speed import apply_liger

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model: calls.append(model)
    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None}
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patch)
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    assert "no kernels for model type 'bert'" in apply_liger(bert) and not calls
    assert apply_liger(lora_llama()) is None and len(calls) == 1
