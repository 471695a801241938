"""The benchmark's verdicts: ratios against the targets, memory condition, Ray overhead, FP8 parity."""

from __future__ import annotations

from benchmarks.bench import summarize


def rows(engine_tps=97_000.0, engine_mem=42.0, plain_tps=98_500.0):
    return [
        {"case": "hf_lora", "tokens_per_s": 45_000, "peak_mem_gib": 54.6},
        {"case": "hf_lora_liger", "tokens_per_s": 63_000, "peak_mem_gib": 49.7},
        {"case": "whisper_full", "samples_per_s": 180.0},
        {"case": "engine_ray", "tokens_per_s": engine_tps, "peak_mem_gib": engine_mem},
        {"case": "engine_plain", "tokens_per_s": plain_tps, "train_loss": [12.0, 11.0], "perf_plan": {"fp8": True}},
        {"case": "engine_plain_alt", "tokens_per_s": 84_000, "train_loss": [12.0, 11.011], "perf_plan": {"fp8": False}},
        {"case": "engine_whisper_full", "samples_per_s": 179.0},
    ]


def test_summary_against_best_peer_and_targets():
    s = summarize(rows())
    lora = s["lora_speedup"]
    assert lora["best_peer"] == "hf_lora_liger" and lora["ratio"] == round(97_000 / 63_000, 3) and lora["met"]
    assert abs(s["ray_overhead_pct"]["overhead_pct"] - 100 * (1 - 97 / 98.5)) < 0.01 and s["ray_overhead_pct"]["met"]
    assert s["fp8_parity"]["max_rel_loss_diff"] == 0.001
    whisper = s["whisper_full_speedup"]
    assert not whisper["met"] and whisper["short_by_pct"] == round(100 * (1.5 - 179 / 180) / 1.5, 1)


def test_the_fastest_speech_variant_is_compared_and_named():
    s = summarize(rows() + [{"case": "engine_whisper_full_bf16w", "samples_per_s": 230.0},
                            {"case": "engine_whisper_full_bf16w_compile", "error": "exit 1"},
                            {"case": "engine_w2v2_ctc_bf16w", "samples_per_s": 400.0}])
    whisper = s["whisper_full_speedup"]
    assert whisper["engine_case"] == "engine_whisper_full_bf16w" and whisper["ratio"] == round(230 / 180, 3) and not whisper["met"]
    assert "w2v2_ctc_speedup" not in s  # no peer row for it in this run


def test_a_speech_row_through_shoulders_train_counts_and_its_ray_cost_is_against_the_same_variant():
    s = summarize(rows() + [{"case": "engine_whisper_full_bf16w", "samples_per_s": 230.0},
                            {"case": "engine_whisper_full_ray", "samples_per_s": 226.0, "variant": "bf16w"}])
    assert s["whisper_full_ray_overhead_pct"]["overhead_pct"] == round(100 * (1 - 226 / 230), 2)
    assert s["whisper_full_speedup"]["engine_case"] == "engine_whisper_full_bf16w"
    s = summarize(rows() + [{"case": "engine_whisper_full_ray", "samples_per_s": 300.0, "variant": "base"}])
    assert s["whisper_full_speedup"]["engine_case"] == "engine_whisper_full_ray" and s["whisper_full_speedup"]["met"]
    assert s["whisper_full_ray_overhead_pct"]["plain_samples_per_s"] == 179.0


def test_more_memory_than_the_peer_fails_the_lora_target_and_overhead_over_two_percent_fails():
    s = summarize(rows(engine_tps=95_000.0, engine_mem=50.0, plain_tps=99_000.0))
    assert s["lora_speedup"]["ratio"] > 1.4 and not s["lora_speedup"]["memory_ok"] and not s["lora_speedup"]["met"]
    assert not s["ray_overhead_pct"]["met"]


def test_fits_in_object_store_decides_in_memory_shuffle(tmp_path, monkeypatch):
    import ray

    from cluster.ingest.read import fits_in_object_store
    from cluster.ingest.splits import SplitInfo

    path = tmp_path / "a.parquet"
    path.write_bytes(b"x" * 1000)
    split = SplitInfo(name="train", files=[str(path)], format="parquet", num_rows=10)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"object_store_memory": 100_000})
    assert fits_in_object_store(split)  # 4 kB expanded vs 20 kB
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"object_store_memory": 10_000})
    assert not fits_in_object_store(split)
    assert not fits_in_object_store(SplitInfo(name="train", files=["s3://bucket/x.parquet"], format="parquet", num_rows=10))


def test_the_ray_speech_row_takes_the_fastest_variant_timed_without_ray_and_profiles_read_in_one_line():
    from benchmarks.bench import profile_note, speech_ray_variant

    timed = [{"case": "engine_whisper_full", "variant": "base", "samples_per_s": 179.0},
             {"case": "engine_whisper_full_bf16w_compile", "variant": "bf16w_compile", "samples_per_s": 231.0},
             {"case": "engine_whisper_full_bf16w", "variant": "bf16w", "error": "exit 1"},
             {"case": "engine_w2v2_ctc_bf16w", "variant": "bf16w", "samples_per_s": 900.0}]
    assert speech_ray_variant(None, timed, "whisper_full", gpu=True) == "bf16w_compile"
    assert speech_ray_variant("base", timed, "whisper_full", gpu=True) == "base"
    assert speech_ray_variant(None, [], "whisper_full", gpu=True) == "bf16w"
    assert speech_ray_variant(None, [], "w2v2_ctc", gpu=False) == "base"
    note = profile_note({"gpu_ms_per_step": 171.4, "ms_per_step_by_kind": {"matmul": 45.2, "attention": 40.0, "other": 60.1, "optimizer": 0.0}})
    assert note == "GPU 171 ms/step: other 60, matmul 45, attention 40"
