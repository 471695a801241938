"""The benchmark's workloads: the peer's model shapes, written as a model folder, a tokenizer and data files
that ``shoulders train`` reads like any user's.

The shapes come from ``shared/bench/peer_baseline.py`` itself (imported, not copied): ``llama_cfg()``,
``SEQ``, ``MB`` and ``lora_flops_per_token()``. Weights are random (``model.from_scratch``); throughput does
not depend on them. The text is random words of a word-level tokenizer with the model's vocabulary size, so
every row tokenizes to exactly ``seq`` tokens and the engine's Ray Data path (read -> tokenize -> stream)
does real work.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEER_CANDIDATES = (ROOT.parent / "shared" / "bench" / "peer_baseline.py", ROOT / "shared" / "bench" / "peer_baseline.py", ROOT / ".peer" / "peer_baseline.py")


def peer_script() -> Path:
    """Where ``peer_baseline.py`` is: ``../shared/bench`` beside the checkout, or a copy carried in ``.peer/``."""
    for path in PEER_CANDIDATES:
        if path.is_file():
            return path
    raise FileNotFoundError(f"peer_baseline.py not found in {[str(p) for p in PEER_CANDIDATES]}")


def load_peer(tiny: bool, micro_batch: int | None = None) -> Any:
    """Import ``peer_baseline.py`` as a module (its argparse reads ``sys.argv``, so set it for the import)."""
    argv = ["peer_baseline.py"] + (["--tiny"] if tiny else []) + ([f"--mb={micro_batch}"] if micro_batch else [])
    saved, sys.argv = sys.argv, argv
    try:
        spec = importlib.util.spec_from_file_location("peer_baseline", peer_script())
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.argv = saved
    return module


SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose vocabulary is ``<pad> <unk> <s> </s> w4 ... w{vocab_size-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def write_lm_workload(folder: Path, tiny: bool, micro_batch: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Model folder (config + tokenizer, no weights), train/validation parquet; returns paths and shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    peer = load_peer(tiny, micro_batch)
    cfg = peer.llama_cfg()
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 2, 3
    cfg.use_cache = False
    model_dir = folder / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(model_dir)
    write_tokenizer(model_dir, cfg.vocab_size)
    rng = np.random.default_rng(seed)
    seq = peer.SEQ

    def rows(n: int) -> list[str]:
        ids = rng.integers(len(SPECIALS), cfg.vocab_size, size=(n, seq))
        return [" ".join(f"w{i}" for i in row) for row in ids]

    data = folder / "data"
    data.mkdir(exist_ok=True)
    pq.write_table(pa.table({"text": rows(micro_batch * steps)}), data / "train.parquet")
    pq.write_table(pa.table({"text": rows(micro_batch)}), data / "validation.parquet")
    flops, n_params = peer.lora_flops_per_token(cfg)
    return {
        "model_dir": str(model_dir), "train": str(data / "train.parquet"), "validation": str(data / "validation.parquet"),
        "seq": seq, "micro_batch": micro_batch, "flops_per_token": flops, "params_compute": n_params,
        "model_config": json.loads(cfg.to_json_string()),
    }


def lm_job(workload: dict[str, Any], out_dir: Path, warm: int, steps: int, gpu: bool, perf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job ``shoulders train`` runs for the 1B-shape LoRA case (as a dict; YAML-equivalent)."""
    return {
        "name": "bench-lora",
        "model": {"name": workload["model_dir"], "task": "causal_lm", "from_scratch": True},
        "data": {"train": workload["train"], "validation": workload["validation"], "max_length": workload["seq"],
                 "rows_per_block": workload["micro_batch"]},
        "finetune": {"strategy": "lora", "head_lr": 1e-4},
        "peft": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {"batch_size": workload["micro_batch"], "max_steps": warm + steps, "warmup_ratio": 0.0,
                  "precision": "bf16" if gpu else "fp32", "schedule": "constant"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1.0 if gpu else 0.5},
        "eval": {"every_n_steps": warm, "batch_size": workload["micro_batch"]},
        "output": {"dir": str(out_dir), "export": "none", "keep_checkpoints": 1},
        "perf": perf or {},
    }
