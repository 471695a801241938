"""A corpus of bad inputs a new user writes: job files, values, data files, model folders, audio, exports,
cluster addresses. Each case builds its files in a scratch folder and returns the command line and what the
error must name. ``tests/unit/test_bad_inputs.py`` runs them; nothing here starts Ray.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import yaml


@dataclass
class Ctx:
    """Where a case builds its files: a scratch folder, a good job, a tiny model and data to copy and break."""

    root: Path
    model: Path
    lm_model: Path
    speech_model: Path
    data: dict[str, Path]

    def job(self, **sections: Any) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "name": "bad",
            "model": {"name": str(self.model), "labels": ["food", "sport", "tech"]},
            "data": {k: str(v) for k, v in self.data.items()},
            "optim": {"epochs": 1, "batch_size": 8},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
            "output": {"dir": str(self.root / "out")},
        }
        for key, value in sections.items():
            raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
        return raw

    def write(self, raw: Any, name: str = "job.yaml") -> str:
        path = self.root / name
        path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
        return str(path)

    def train(self, raw: Any, *extra: str) -> list[str]:
        return ["train", self.write(raw), *extra]

    def model_copy(self, source: Path | None = None) -> Path:
        target = self.root / "model"
        shutil.copytree(source or self.model, target)
        return target

    def with_model(self, folder: Path | str, **model: Any) -> list[str]:
        return self.train(self.job(model={"name": str(folder), **model}))

    def rows(self, rows: list[dict[str, Any]], name: str = "train.jsonl") -> Path:
        path = self.root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def good_rows(self, n: int = 12) -> list[dict[str, Any]]:
        return [{"text": f"apple bread {i}", "label": ["food", "sport", "tech"][i % 3]} for i in range(n)]

    def with_train(self, path: Path, **data: Any) -> list[str]:
        return self.train(self.job(data={"train": str(path), **data}))


Case = Callable[[Ctx], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = fn
        return fn
    return register


def simple(name: str, build: Callable[[Ctx], list[str]], *expected: str) -> None:
    """A case whose command ``build`` makes and whose error names ``expected``."""
    CASES[name] = lambda ctx: (build(ctx), list(expected))


# ---------------------------------------------------------------------------------------------------
# The job file itself

simple("yaml: not UTF-8", lambda c: ["train", str(_bytes(c, b"name: caf\xe9\nmodel: {name: x}\n"))], "not UTF-8", "line 1")
simple("yaml: a binary file", lambda c: ["validate", str(_bytes(c, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))))], "job.yaml")
simple("yaml: NUL bytes in UTF-8", lambda c: ["train", str(_bytes(c, b"name: a\x00b\n"))], "NUL")
simple("yaml: alias bomb", lambda c: ["train", c.write(_alias_bomb(c))], "aliases")
simple("yaml: section twice", lambda c: ["train", c.write(_dump_twice(c, "optim"))], "'optim' appears twice", "lines")
simple("yaml: key twice in a section", lambda c: ["train", c.write(
    yaml.safe_dump(c.job()).replace("  batch_size: 8\n", "  batch_size: 8\n  batch_size: 4\n"))], "'batch_size' appears twice")
simple("yaml: a folder", lambda c: ["train", str(c.root)], "is a folder")
simple("yaml: missing file", lambda c: ["train", str(c.root / "nope.yaml")], "does not exist")
simple("yaml: empty file", lambda c: ["train", c.write("")], "must hold a mapping")
simple("yaml: a list", lambda c: ["train", c.write("- model\n- data\n")], "must hold a mapping", "list")
simple("yaml: syntax error", lambda c: ["train", c.write("model: {name: [x\n")], "not valid YAML")
simple("yaml: python tag", lambda c: ["train", c.write("name: !!python/object/apply:os.system ['true']\n")], "not valid YAML")
simple("yaml: tab indentation", lambda c: ["train", c.write("model:\n\tname: x\n")], "not valid YAML")
simple("yaml: too large", lambda c: ["train", c.write("#" * (1 << 21) + "\nname: x\n")], "bytes")
simple("yaml: a scalar", lambda c: ["validate", c.write("just words\n")], "must hold a mapping")

# ---------------------------------------------------------------------------------------------------
# Keys and values

simple("key: unknown in a section", lambda c: c.train(c.job(optim={"learning_rate": 1e-3})), "optim.learning_rate")
simple("key: unknown section", lambda c: c.train({**c.job(), "trainer": {"x": 1}}), "unknown key 'trainer'")
simple("key: missing model", lambda c: c.train({k: v for k, v in c.job().items() if k != "model"}), "'model'")
simple("key: missing data.train", lambda c: c.train({**c.job(), "data": {"validation": str(c.data["validation"])}}), "data.train")
simple("value: batch size a word", lambda c: c.train(c.job(optim={"batch_size": "sixteen"})), "optim.batch_size")
simple("value: batch size 0", lambda c: c.train(c.job(optim={"batch_size": 0})), "optim.batch_size")
simple("value: head_lr inf", lambda c: c.train(c.job(finetune={"head_lr": float("inf")})), "finetune.head_lr")
simple("value: head_lr nan", lambda c: c.train(c.job(finetune={"head_lr": float("nan")})), "finetune.head_lr")
simple("value: head_lr negative", lambda c: c.train(c.job(finetune={"head_lr": -0.1})), "finetune.head_lr")
simple("value: epochs inf", lambda c: c.train(c.job(optim={"epochs": float("inf")})), "optim.epochs")
simple("value: cpus_per_worker inf", lambda c: c.train(c.job(scaling={"cpus_per_worker": float("inf")})), "scaling.cpus_per_worker")
simple("value: warmup_ratio 1.5", lambda c: c.train(c.job(optim={"warmup_ratio": 1.5})), "optim.warmup_ratio")
simple("value: backbone_lr_ratio 100", lambda c: c.train(c.job(finetune={"backbone_lr_ratio": 100})), "finetune.backbone_lr_ratio")
simple("value: inf as an override", lambda c: c.train(c.job(), "finetune.head_lr=.inf"), "finetune.head_lr")
simple("value: freeze_depth above the blocks", lambda c: c.train(c.job(finetune={"freeze_depth": 3})), "finetune.freeze_depth", "2 blocks")
simple("value: freeze_depth 1000", lambda c: c.train(c.job(finetune={"freeze_depth": 1000})), "finetune.freeze_depth")
simple("value: freeze_depth -7", lambda c: c.train(c.job(finetune={"freeze_depth": -7})), "finetune.freeze_depth")
simple("value: freeze_depth override", lambda c: c.train(c.job(), "finetune.freeze_depth=5"), "finetune.freeze_depth")
simple("value: freeze_depth a word", lambda c: c.train(c.job(finetune={"freeze_depth": "half"})), "finetune.freeze_depth")
simple("value: freeze_depth in a tune space", lambda c: ["tune", c.write(c.job(tune={"space": {"finetune.freeze_depth": {"choice": [0, 9]}}}))],
       "tune.space.finetune.freeze_depth")
simple("value: freeze_depth randint in a tune space", lambda c: ["tune", c.write(c.job(tune={"space": {"finetune.freeze_depth": {"randint": [-5, 1]}}}))],
       "tune.space.finetune.freeze_depth")
simple("value: 1000 workers", lambda c: c.train(c.job(scaling={"num_workers": 1000})), "scaling", "num_workers")
simple("value: 64 CPUs per worker", lambda c: c.train(c.job(scaling={"cpus_per_worker": 64})), "scaling.cpus_per_worker")
simple("value: a trial that cannot fit", lambda c: ["tune", c.write(c.job(scaling={"cpus_per_worker": 1.5}, tune={"data_cpus": 64}))], "each trial")
simple("value: eval.metric the task lacks", lambda c: c.train(c.job(eval={"metric": "bleu"})), "eval.metric", "accuracy")
simple("value: tune.metric the task lacks", lambda c: c.train(c.job(tune={"metric": "wer"})), "tune.metric")
simple("value: LoRA targets no module", lambda c: c.train(c.job(finetune={"strategy": "lora"}, peft={"target_modules": ["q_proj", "v_proj"]})),
       "peft.target_modules", "q_proj", "query")
simple("value: unknown strategy", lambda c: c.train(c.job(finetune={"strategy": "turbo"})), "finetune.strategy")
simple("value: unknown task", lambda c: c.train(c.job(model={"task": "translation"})), "model.task")
simple("value: empty label list", lambda c: c.train(c.job(model={"labels": []})), "model.labels", "empty list")
simple("value: duplicate labels", lambda c: c.train(c.job(model={"labels": ["food", "food", "tech"]})), "model.labels")
simple("value: adapter export without PEFT", lambda c: c.train(c.job(output={"export": "adapter"})), "output.export")
simple("value: zero_stage under ddp", lambda c: c.train(c.job(backend={"zero_stage": 2})), "backend.zero_stage")
simple("value: DeepSpeed stage 7", lambda c: c.train(c.job(backend={"name": "deepspeed", "config": _ds(c, {"zero_optimization": {"stage": 7}})})),
       "zero_optimization.stage")
simple("value: DeepSpeed stage a word", lambda c: c.train(c.job(backend={"name": "deepspeed", "config": _ds(c, {"zero_optimization": {"stage": "two"}})})),
       "zero_optimization.stage")
simple("value: DeepSpeed JSON missing", lambda c: c.train(c.job(backend={"name": "deepspeed", "config": str(c.root / "ds.json")})), "backend.config")
simple("value: DeepSpeed JSON broken", lambda c: c.train(c.job(backend={"name": "deepspeed", "config": str(_bytes(c, b"{stage", "ds.json"))})), "backend.config")
simple("value: name escapes the output folder", lambda c: c.train(c.job(name="../../../x")), "'name'")
simple("value: name with a slash", lambda c: c.train(c.job(name="a/b")), "'name'")
simple("value: labels on causal_lm", lambda c: c.train(c.job(model={"name": str(c.lm_model), "task": "causal_lm"})), "model.labels")
simple("value: unfreezing with LoRA", lambda c: c.train(c.job(finetune={"strategy": "lora"}, safeguards={"unfreeze_every_steps": 2})), "unfreeze")
simple("override: below a scalar", lambda c: c.train(c.job(), "optim.epochs.x=1"), "optim.epochs")
simple("override: unknown key", lambda c: c.train(c.job(), "optim.lr=0.1"), "optim.lr")
simple("override: alias bomb", lambda c: c.train(c.job(), "name=" + _alias_bomb_flow()), "aliases")

# ---------------------------------------------------------------------------------------------------
# Data

simple("data: missing file", lambda c: c.with_train(c.root / "nope.parquet"), "data.train", "nope.parquet")
simple("data: glob matching nothing", lambda c: c.with_train(c.root / "*.parquet"), "data.train")
simple("data: unknown extension", lambda c: c.with_train(_bytes(c, b"a,b\n", "train.txt")), "data.train", "format")
simple("data: text column missing", lambda c: c.train(c.job(data={"text_column": "sentence"})), "column 'sentence'", "data.text_column")
simple("data: label column missing", lambda c: c.train(c.job(data={"label_column": "topic"})), "column 'topic'")
simple("data: pair column missing", lambda c: c.train(c.job(data={"text_pair_column": "second"})), "column 'second'")
simple("data: CSV not UTF-8", lambda c: c.with_train(_bytes(c, b"text,label\napple,food\ncaf\xe9 bread,food\nball,sport\n", "train.csv")),
       "train.csv", "row 2", "UTF-8")
simple("data: JSONL not UTF-8", lambda c: c.with_train(_bytes(c, b'{"text": "apple", "label": "food"}\n{"text": "caf\xe9", "label": "food"}\n', "train.jsonl")),
       "data.train", "train.jsonl")
simple("data: null label", lambda c: c.with_train(c.rows(c.good_rows()[:4] + [{"text": "apple", "label": None}] + c.good_rows()[4:])),
       "train.jsonl", "row 5", "'label'")
simple("data: null text", lambda c: c.with_train(c.rows(c.good_rows()[:2] + [{"text": None, "label": "food"}] + c.good_rows()[2:])),
       "train.jsonl", "row 3", "'text'")
simple("data: integer text column", lambda c: c.with_train(c.rows([{"text": i, "label": "food" if i % 2 else "tech"} for i in range(10)])),
       "row 1", "not text")
simple("data: label outside model.labels", lambda c: c.with_train(c.rows(c.good_rows() + [{"text": "x", "label": "politics"}])),
       "data.train", "politics")
simple("data: label index out of range", lambda c: c.with_train(c.rows([{"text": "a", "label": i % 5} for i in range(10)])), "data.train", "4")
simple("data: unknown label in validation", lambda c: c.train(c.job(data={"validation": str(c.rows(c.good_rows() + [{"text": "x", "label": "art"}], "val.jsonl"))})),
       "data.validation", "art")
simple("data: header-only CSV", lambda c: c.with_train(_bytes(c, b"text,label\n", "train.csv")), "data.train", "no rows")
simple("data: garbage parquet", lambda c: c.with_train(_bytes(c, os.urandom(2048), "train.parquet")), "data.train", "could not read")
simple("data: JSON array, not JSON lines", lambda c: c.with_train(_bytes(c, json.dumps(c.good_rows()).encode(), "train.json")), "data.train")
simple("data: one distinct label", lambda c: c.train({**c.job(data={"train": str(c.rows([{"text": "a", "label": "food"}] * 5))}),
                                                      "model": {"name": str(c.model)}}), "fewer than 2")
simple("data: no validation at all", lambda c: c.train({**c.job(), "data": {"train": str(c.data["train"]), "validation_fraction": 0}}), "validation_fraction")
simple("data: retention file missing", lambda c: c.train(c.job(safeguards={"retention_data": str(c.root / "general.parquet")})),
       "safeguards.retention_data", "general.parquet")
simple("data: retention file without the text column", lambda c: c.train(c.job(safeguards={"retention_data": str(c.rows([{"body": "x"}], "general.jsonl"))})),
       "safeguards.retention_data", "'text'")
simple("data: null text in parquet", lambda c: c.with_train(_parquet(c, {"text": ["a", None, "b"], "label": ["food", "tech", "food"]})), "row 2", "'text'")

# ---------------------------------------------------------------------------------------------------
# Model folders and hub ids

simple("model: folder missing", lambda c: c.with_model(c.root / "no-such-model"), "model.name", "does not exist")
simple("model: relative folder missing", lambda c: c.train(c.job(model={"name": "./nope/model"})), "does not exist")
simple("model: a file", lambda c: c.with_model(_bytes(c, b"{}", "model.bin")), "is a file")
simple("model: no config.json", lambda c: c.with_model(_remove(c.model_copy(), "config.json")), "no config.json")
simple("model: config.json a list", lambda c: c.with_model(_put(c.model_copy(), "config.json", b"[1, 2]")), "config.json", "list")
simple("model: config.json not JSON", lambda c: c.with_model(_put(c.model_copy(), "config.json", b"{model_type: bert")), "not a JSON model config")
simple("model: config.json without model_type", lambda c: c.with_model(_put(c.model_copy(), "config.json", b'{"hidden_size": 32}')), "model_type")
simple("model: unknown architecture", lambda c: c.with_model(_put(c.model_copy(), "config.json", b'{"model_type": "nosuchnet"}')), "nosuchnet")
simple("model: weights missing", lambda c: c.with_model(_remove(c.model_copy(), "model.safetensors")), "no weights")
simple("model: weights truncated", lambda c: c.with_model(_truncate(c.model_copy() / "model.safetensors")), "model.safetensors", "cut short")
simple("model: weights garbage", lambda c: c.with_model(_put(c.model_copy(), "model.safetensors", os.urandom(4096))), "model.safetensors", "unreadable")
simple("model: weights empty", lambda c: c.with_model(_put(c.model_copy(), "model.safetensors", b"")), "model.safetensors")
simple("model: torch weights garbage", lambda c: c.with_model(_put(_remove(c.model_copy(), "model.safetensors"), "pytorch_model.bin", os.urandom(512))),
       "pytorch_model.bin", "unreadable")
simple("model: shard missing", lambda c: c.with_model(_put(_remove(c.model_copy(), "model.safetensors"), "model.safetensors.index.json",
                                                          b'{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')), "model-00001-of-00002.safetensors")
simple("model: tokenizer missing", lambda c: c.with_model(_remove(c.model_copy(), "tokenizer.json", "tokenizer_config.json")), "no tokenizer")
simple("model: tokenizer garbage", lambda c: c.with_model(_put(c.model_copy(), "tokenizer.json", b"\x00\x01garbage")), "tokenizer.json")
simple("model: causal_lm on an encoder", lambda c: c.train({**c.job(), "model": {"name": str(c.model), "task": "causal_lm"}}), "encoder-only")
simple("model: audio task on a text model", lambda c: c.train(c.job(model={"name": str(c.model), "task": "audio_classification", "labels": ["a", "b"]})),
       "cannot do model.task")
simple("model: hub id not in the cache", lambda c: c.with_model(Path("nosuch-org/nosuch-model")), "nosuch-org/nosuch-model", "hub")
simple("model: text task on a speech model", lambda c: c.with_model(c.speech_model), "cannot do model.task")

# ---------------------------------------------------------------------------------------------------
# Output folders and runs

simple("output: a file", lambda c: c.train(c.job(output={"dir": str(_bytes(c, b"x", "taken"))})), "output.dir", "is a file")
simple("output: under a file", lambda c: c.train(c.job(output={"dir": str(_bytes(c, b"x", "taken") / "run")})), "output.dir", "lies under")
simple("output: finished run there", lambda c: c.train(c.job(output={"dir": str(_put(c.root / "done", "metrics.json", b"{}"))})), "already holds a finished run")
simple("output: --resume without a run", lambda c: c.train(c.job(), "--resume"), "no run to resume")
simple("output: under /proc", lambda c: c.train(c.job(output={"dir": "/proc/shoulders-run/out"})), "output.dir", "'/proc'", "no folder can be made")
simple("output: storage_path a file", lambda c: c.train(c.job(run={"storage_path": str(_bytes(c, b"x", "store"))})), "run.storage_path")

# ---------------------------------------------------------------------------------------------------
# Speech data


def _speech(c: Ctx, rows: list[str], files: dict[str, bytes | None]) -> list[str]:
    import numpy as np
    import soundfile as sf

    for name, content in files.items():
        if content is None:
            sf.write(c.root / name, (0.1 * np.sin(np.arange(1600) / 5)).astype("float32"), 16000)
        else:
            (c.root / name).write_bytes(content)
    manifest = c.root / "speech.csv"
    manifest.write_text("audio,label\n" + "".join(r + "\n" for r in rows))
    return c.train(c.job(model={"name": str(c.speech_model), "task": "audio_classification", "labels": ["yes", "no"]},
                         data={"train": str(manifest), "validation": str(manifest), "test": None}))


def _empty_wav() -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(0, dtype="float32"), 16000, format="WAV")
    return buffer.getvalue()


simple("speech: empty clip", lambda c: _speech(c, ["a.wav,yes", "b.wav,no"], {"a.wav": None, "b.wav": _empty_wav()}), "b.wav", "0 samples")
simple("speech: unreadable clip", lambda c: _speech(c, ["a.wav,yes", "b.wav,no"], {"a.wav": None, "b.wav": b"RIFFnotawav"}), "b.wav", "could not read")
simple("speech: missing clip", lambda c: _speech(c, ["a.wav,yes", "gone.wav,no"], {"a.wav": None}), "gone.wav")
simple("speech: null audio", lambda c: _speech(c, ["a.wav,yes", ",no"], {"a.wav": None}), "row 2", "'audio'")

# ---------------------------------------------------------------------------------------------------
# shoulders eval, submit


def _export(c: Ctx, meta: bytes) -> str:
    folder = c.root / "export"
    folder.mkdir()
    (folder / "shoulders_job.json").write_bytes(meta)
    return str(folder)


simple("eval: metadata not JSON", lambda c: ["eval", _export(c, b"{not json"), "--data", str(c.data["test"])], "shoulders_job.json")
simple("eval: metadata a list", lambda c: ["eval", _export(c, b"[]"), "--data", str(c.data["test"])], "shoulders_job.json")
simple("eval: not an export", lambda c: ["eval", str(c.root), "--data", str(c.data["test"])], "not a shoulders export")
simple("eval: labels the model does not know", lambda c: ["eval", _export(c, json.dumps({"job": c.job(), "labels": ["food", "sport", "tech"]}).encode()),
                                                          "--data", str(c.rows(c.good_rows() + [{"text": "x", "label": "opera"}], "eval.jsonl"))], "opera")
simple("submit: malformed address", lambda c: ["submit", c.write(c.job()), "--address", "http://:99999"], "--address")
simple("submit: address with spaces", lambda c: ["status", "raysubmit_x", "--address", "not an address"], "--address")
simple("submit: port out of range", lambda c: ["list", "--address", "http://127.0.0.1:70000"], "--address")


# ---------------------------------------------------------------------------------------------------
# File builders


def _bytes(c: Ctx, data: bytes, name: str = "job.yaml") -> Path:
    path = c.root / name
    path.write_bytes(data)
    return path


def _put(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


def _remove(folder: Path, *names: str) -> Path:
    for name in names:
        (folder / name).unlink()
    return folder


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.parent


def _parquet(c: Ctx, columns: dict[str, list[Any]]) -> Path:
    path = c.root / "train.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def _ds(c: Ctx, config: dict[str, Any]) -> str:
    path = c.root / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def _alias_bomb(c: Ctx) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n" + yaml.safe_dump(c.job()).replace("name: bad", "name: *a8")


def _alias_bomb_flow() -> str:
    levels = ["&a0 [" + ", ".join(["x"] * 10) + "]"] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    return "[" + ", ".join(levels) + "]"


def _dump_twice(c: Ctx, section: str) -> str:
    text = yaml.safe_dump(c.job())
    return text + yaml.safe_dump({section: {"epochs": 2}})
