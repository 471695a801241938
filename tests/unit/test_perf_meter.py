"""Throughput metrics: the MFU convention of the peer benchmark, and the perf settings' effects."""

from __future__ import annotations


import pytest
import torch

from engine.perf.speed import ThroughputMeter, cast_for_mixed_precision, flops_per_token, matmul_params

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


class _ToySpeech(torch.nn.Module):
    """input_values (rows, 8) -> Linear(8, 4) -> loss = sum: 64 FLOPs forward per row, 64 for the weight
    gradient, and no input gradient (audio needs none)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 4, bias=False)

    def forward(self, input_values, labels=None):
        from types import SimpleNamespace

        out = torch.nn.functional.dropout(self.proj(input_values), 0.5, training=True)
        return SimpleNamespace(loss=out.sum())


def test_speech_flops_are_counted_once_and_scaled_by_input_length_without_touching_grads_or_rng():
    model = _ToySpeech()
    meter = ThroughputMeter(model, torch.device("cpu"), world_size=1, peak_tflops=1e-6)
    batch = {"input_values": torch.randn(3, 8)}
    rng = torch.get_rng_state()
    meter.add(batch, samples=3)
    assert meter.flops_per_input == pytest.approx(128 / 8)  # forward 2*8*4 and weight gradient 2*8*4 per row
    assert model.proj.weight.grad is None and torch.equal(torch.get_rng_state(), rng)
    meter.add({"input_values": torch.randn(2, 16)}, samples=2)  # longer audio: twice the FLOPs per row
    out = meter.read()
    assert out["tflops_per_s_per_device"] * out["window_s"] * 1e12 == pytest.approx(3 * 128 + 2 * 256)
    assert out["mfu_pct"] > 0


def test_speech_flops_of_a_whisper_full_finetune_are_about_three_forwards():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=100, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=3, max_source_positions=1500)
    model = WhisperForConditionalGeneration(cfg)
    batch = {"input_features": torch.randn(2, 80, 3000), "labels": torch.randint(4, 100, (2, 12))}
    meter = ThroughputMeter(model, torch.device("cpu"), world_size=1)
    meter.add(batch, samples=2)
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        model(**{k: v[:1] for k, v in batch.items()})
    ratio = meter.counted_flops / 2 / forward.get_total_flops()
    # every weight trains: weight and input gradients ~ 2x the forward, less the input gradient of the first
    # convolution (the log-mel features need none)
    assert 2.6 < ratio < 3.0
    assert all(p.grad is None for p in model.parameters())
