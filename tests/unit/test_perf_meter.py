"""Throughput metrics: the MFU convention of the peer benchmark, and the perf settings' effects."""

from __future__ import annotations


import pytest
import torch

from engine.perf import ThroughputMeter, cast_for_mixed_precision, flops_per_token, matmul_params

def load_peer(monkeypatch):
    """The peer benchmark module (../shared/bench beside the checkout, or the vendored copy in benchmarks/)."""
    from benchmarks.workload import load_peer as load_peer_module

    return load_peer_module(tiny=True)


def test_flops_per_token_matches_peer_formula(monkeypatch):
    from transformers import LlamaForCausalLM

    peer = load_peer(monkeypatch)
    cfg = peer.llama_cfg()
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)  # LoRA: the base is frozen, so no weight gradients in the count
    n_all, n_trainable = matmul_params(model)
    expected, n_peer = peer.lora_flops_per_token(cfg)
    assert n_all == n_peer and n_trainable == 0
    assert flops_per_token(n_all, n_trainable, cfg.num_hidden_layers, cfg.hidden_size, peer.SEQ) == expected


def test_meter_counts_tokens_without_padding_and_full_finetune_flops():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    meter = ThroughputMeter(model, torch.device("cpu"), world_size=2, peak_tflops=1e-6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    meter.add({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask})
    out = meter.read()
    tokens_per_s = out["tokens_per_s"] * out["window_s"]
    assert tokens_per_s == pytest.approx(5 * 2)  # 5 real tokens on each of 2 workers
    n_all, n_trainable = matmul_params(model)
    assert n_trainable == n_all  # full fine-tune: weight gradients counted (6N)
    flops = 5 * 6 * n_all + 12 * 2 * 32 * 4 * 2 * 4
    assert out["tflops_per_s_per_device"] * out["window_s"] * 1e12 == pytest.approx(flops)
    assert "mfu_pct" in out


def test_cast_for_mixed_precision_keeps_master_weights_fp32():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert cast_for_mixed_precision(model, torch.bfloat16) == "bfloat16"
    assert model[0].weight.dtype == torch.bfloat16
    assert model[1].weight.dtype == torch.float32 and model[1].bias.dtype == torch.float32
