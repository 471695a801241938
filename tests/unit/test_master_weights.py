"""perf.trainable_weights_in_compute_dtype: bf16 weights, fp32 masters in the optimizer, fp32 gradient sums,
fp32 logits; the same training as fp32 weights under autocast, within bf16 rounding, and exact checkpoints."""

from __future__ import annotations

import pytest
import torch

from engine.backends.ddp import DDPBackend
from engine.config.schema import build_job
from engine.loop.optim import build_param_groups


def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=96, num_mel_bins=8, max_source_positions=16,
                        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    return WhisperForConditionalGeneration(cfg)


def backend_for(master: bool, accum: int = 1, seed: int = 0, world_size: int = 1) -> DDPBackend:
    model = tiny_whisper()
    job = build_job({
        "model": {"name": "x", "task": "speech_seq2seq"}, "data": {"train": "t"},
        "optim": {"precision": "bf16", "grad_accum": accum, "warmup_ratio": 0.0, "max_grad_norm": 1.0},
        "finetune": {"strategy": "full", "head_lr": 3e-3, "backbone_lr_ratio": 1.0},
        "perf": {"trainable_weights_in_compute_dtype": master},
    })
    groups = build_param_groups(model, ["proj_out"], 3e-3, 1.0, 1.0, 0.01)
    return DDPBackend(job, model, groups, total_steps=50, warmup_steps=0, device=torch.device("cpu"), world_size=world_size)


def batches(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_features": torch.randn(4, 8, 32, generator=g), "labels": torch.randint(4, 96, (4, 6), generator=g)} for _ in range(n)]


def train(backend: DDPBackend, data: list[dict[str, torch.Tensor]]) -> list[float]:
    losses = []
    for batch in data:
        losses.append(float(backend.forward_backward(batch).loss.detach()))
        backend.step()
    return losses


def test_weights_are_bf16_the_optimizer_steps_fp32_masters_and_the_logits_are_fp32():
    backend = backend_for(master=True)
    model = backend.module
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    opt_params = [p for g in backend.optimizer.param_groups for p in g["params"]]
    assert opt_params and all(p.dtype == torch.float32 for p in opt_params)
    assert not any(p is q for p in opt_params for q in model.parameters())
    before = [m.detach().clone() for m in backend.master.masters]
    out = backend.forward_backward(batches(1)[0])
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert all(p.grad is None for p in model.parameters())  # folded into the masters' fp32 gradients
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in backend.master.masters)
    assert backend.step()
    changed = sum(not torch.equal(a, m) for a, m in zip(before, backend.master.masters))
    assert changed == len(before)
    for param, master in zip(backend.master.params, backend.master.masters):  # published back, rounded to bf16
        assert torch.equal(param.detach(), master.detach().to(torch.bfloat16))


def test_training_matches_fp32_weights_under_autocast_within_bf16_rounding():
    data = batches(1) * 12  # one batch, memorised
    autocast = train(backend_for(master=False), data)
    master = train(backend_for(master=True), data)
    assert master[-1] < master[0] - 0.5  # it learns
    diffs = [abs(a - b) / abs(b) for a, b in zip(master, autocast)]
    assert max(diffs) < 0.01, (master, autocast)


def test_micro_batch_gradients_are_summed_in_fp32():
    backend = backend_for(master=True, accum=2)
    first, second = batches(2)
    backend.forward_backward(first)
    assert not backend.step()
    after_one = [m.grad.clone() for m in backend.master.masters]
    backend.forward_backward(second)
    sums = [m.grad.clone() for m in backend.master.masters]

    alone = backend_for(master=True, accum=2)
    alone.forward_backward(second)
    expected = [a + b.grad for a, b in zip(after_one, alone.master.masters)]
    for got, want in zip(sums, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_checkpoint_holds_the_fp32_masters_and_restores_them_bit_for_bit(tmp_path):
    from safetensors.torch import save_file

    backend = backend_for(master=True)
    train(backend, batches(3))
    state = backend.trainable_state()
    assert set(state) == {n for n, p in backend.module.named_parameters() if p.requires_grad}
    assert all(t.dtype == torch.float32 for t in state.values())
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in state.values())  # more than bf16 holds
    save_file(state, tmp_path / "trainable.safetensors")
    backend.save(tmp_path, rank=0)

    restored = backend_for(master=True, seed=5)
    restored.load(tmp_path)
    for name, tensor in restored.trainable_state().items():
        assert torch.equal(tensor, state[name]), name
    data = batches(2, seed=9)
    assert train(restored, data) == train(backend, data)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_without_bf16_compute_the_setting_changes_nothing(precision):
    model = tiny_whisper()
    job = build_job({"model": {"name": "x", "task": "speech_seq2seq"}, "data": {"train": "t"}, "optim": {"precision": precision},
                     "perf": {"trainable_weights_in_compute_dtype": True}})
    groups = build_param_groups(model, ["proj_out"], 1e-3, 1.0)
    backend = DDPBackend(job, model, groups, total_steps=5, warmup_steps=0, device=torch.device("cpu"), world_size=1)
    assert backend.master is None and {p.dtype for p in model.parameters()} == {torch.float32}


def test_lora_over_fp8_frozen_weights_trains_with_masters_for_the_adapters_only():
    from engine.perf.speed import apply_perf
    from test_perf_apply import lora_llama

    model = lora_llama()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    job = build_job({"model": {"name": "x", "task": "causal_lm"}, "data": {"train": "t"},
                     "optim": {"precision": "bf16", "warmup_ratio": 0.0, "grad_accum": 2}, "finetune": {"strategy": "lora", "head_lr": 1e-2},
                     "perf": {"trainable_weights_in_compute_dtype": True, "fp8_frozen": "on"}})
    plan = apply_perf(model, job.perf, "causal_lm", torch.device("cpu"), torch.bfloat16)
    assert plan.fp8_layers == 14 and plan.fused_lora == 14
    backend = DDPBackend(job, model, build_param_groups(model, [], 1e-2, 1.0), total_steps=20, warmup_steps=0,
                         device=torch.device("cpu"), world_size=1)
    assert sorted(backend.master.names) == trainable and set(backend.trainable_state()) == set(trainable)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(16):
        losses.append(float(backend.forward_backward({"input_ids": ids, "labels": ids}).loss.detach()))
        backend.step()
    assert losses[-1] < losses[0] - 0.2


def _two_worker_window(rank: int, port: int, out: str) -> None:
    """One DDP worker: an accumulation window of two micro-batches, its own first one and a shared last one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        backend = backend_for(master=True, accum=2, world_size=2)
        backend.forward_backward(batches(1, seed=10 + rank)[0])
        backend.forward_backward(batches(1, seed=99)[0])
        torch.save([m.grad for m in backend.master.masters], f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_average_the_window_in_fp32(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_worker_window, args=(port, str(tmp_path)), nprocs=2, join=True)

    def window_grads(seed: int) -> list[torch.Tensor]:
        backend = backend_for(master=True, accum=2)
        backend.forward_backward(batches(1, seed=seed)[0])
        return [m.grad.clone() for m in backend.master.masters]

    first = [window_grads(10), window_grads(11)]  # each worker's own micro-batch, summed locally in fp32
    shared = window_grads(99)  # identical on both workers: DDP's bf16 average of it is exact
    expected = [(a + b) / 2 + c for a, b, c in zip(*first, shared)]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for g, want in zip(got, expected):
            torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-9)  # bf16 sums would be off by ~4e-3 relative
